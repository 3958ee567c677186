//! R2* fitters with quality maps: log-linear, S²-weighted log-linear, ARLO and
//! Levenberg–Marquardt nonlinear least squares (optionally on the Rician first moment).
//!
//! Data layout, chunking and status conventions are those of [`crate::relax::r2star`]: magnitude
//! echo-major `[E][N]`, failed voxels NaN with a non-zero [`R2starStatus`]-style code.
//!
//! Every method also returns, per voxel,
//! - `gof`: the coefficient of determination R² = 1 − RSS/TSS of the fitted signal model
//!   against the magnitudes (linear domain);
//! - `sd`: the Cramér–Rao standard deviation of R2* [s⁻¹] at the fitted parameters, from
//!   the Fisher information JᵀJ/σ² of the signal model with Gaussian noise of standard
//!   deviation σ (the given noise level, or the residual estimate RSS/(E−2)). For the
//!   Rician model J is the derivative of the Rician mean (a first-order approximation of
//!   the Rician Fisher information, accurate where the signal is well above the floor).
//!
//! ARLO (Pei et al., MRM 2015;73:843): for each echo triple, the integral of the signal
//! between TE_i and TE_{i+2} equals T2*·(S_i − S_{i+2}) for a mono-exponential decay;
//! the integral I_i is taken by Simpson's rule (the non-uniform form when the spacing is
//! uneven, so uneven echo spacing is handled), and T2* solves Pei's closed form
//! T2* = Σ(I_i² + h_i·I_i·d_i) / Σ(h_i·d_i² + I_i·d_i), d_i = S_i − S_{i+2},
//! h_i = (TE_{i+2} − TE_i)/6 (= ΔTE/3 as in the paper for even spacing). S0 is then the
//! linear least-squares amplitude for that R2*.
//!
//! The nonlinear fit minimises Σ (S_k − μ_k)² over (S0, R2*) by Levenberg–Marquardt,
//! started from the weighted log-linear fit; μ_k = S0·exp(−R2*·TE_k), or with a known
//! noise σ the Rician first moment μ = σ√(π/2)·L_{1/2}(−A²/2σ²) of A = S0·exp(−R2*·TE_k)
//! (Feng et al. MRM 2013), which removes the noise-floor bias of late echoes.

use crate::error::{CoreError, CoreResult};
use crate::field::fieldmap::check_echo_times;
use crate::grid::check_echo_major;
use crate::relax::r2star::{
    avx2_dispatch, exp_fast, finish_status, fit_chunk_ols, fit_chunk_weighted, not_loggable,
    EchoLayout, Rows, CHUNK,
};
use rayon::prelude::*;

/// Additional status codes beyond those of [`crate::relax::r2star::R2starStatus`] (0–3).
pub mod status {
    /// Fit succeeded.
    pub const OK: u8 = 0;
    /// A magnitude was zero, negative or non-finite in at least one echo.
    pub const BAD_MAGNITUDE: u8 = 1;
    /// Degenerate fit or non-finite result.
    pub const DEGENERATE: u8 = 2;
    /// Outside the mask (not fitted).
    pub const OUTSIDE_MASK: u8 = 3;
    /// The nonlinear fit did not converge within the iteration limit.
    pub const NOT_CONVERGED: u8 = 4;
}

/// Which estimator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum R2starMethod {
    /// Ordinary least squares of ln S on TE.
    LogLinear,
    /// One-step least squares of ln S on TE with weights S².
    Weighted,
    /// Auto-regression on linear operations (Pei 2015); needs ≥ 3 echoes.
    Arlo,
    /// Levenberg–Marquardt on the signal (Rician first moment when σ is given).
    Nlls,
}

impl R2starMethod {
    /// Parse the Python-facing name.
    pub fn from_name(name: &str) -> CoreResult<Self> {
        match name {
            "loglinear" => Ok(Self::LogLinear),
            "weighted" => Ok(Self::Weighted),
            "arlo" => Ok(Self::Arlo),
            "nlls" => Ok(Self::Nlls),
            other => Err(CoreError::InvalidArgument(format!(
                "unknown R2* method {other:?}; use loglinear, weighted, arlo or nlls"
            ))),
        }
    }
}

/// Options of [`fit_r2star_into`]; defaults: weighted, σ unknown, 100 LM iterations.
#[derive(Debug, Clone, Copy)]
pub struct R2starOptions {
    pub method: R2starMethod,
    /// Noise standard deviation of the underlying complex data (magnitude units). With
    /// `Nlls` it switches on the Rician model; with every method it is the σ of the CRLB.
    pub noise_sigma: Option<f64>,
    pub max_iter: usize,
    /// Compute the R² and CRLB maps (one more pass with an exponential per echo);
    /// without them `sd` and `gof` are NaN and closed-form fits run about twice as fast.
    pub quality: bool,
    /// Memory layout of the magnitude (echo-major unless stated).
    pub layout: EchoLayout,
}

impl Default for R2starOptions {
    fn default() -> Self {
        Self {
            method: R2starMethod::Weighted,
            noise_sigma: None,
            max_iter: 100,
            quality: true,
            layout: EchoLayout::EchoMajor,
        }
    }
}

/// Caller-provided per-voxel outputs (all of length N).
pub struct R2starOutputs<'a> {
    /// R2* [s⁻¹].
    pub r2star: &'a mut [f32],
    /// S0 (magnitude units).
    pub s0: &'a mut [f32],
    /// Cramér–Rao standard deviation of R2* [s⁻¹].
    pub sd: &'a mut [f32],
    /// R² goodness of fit (≤ 1).
    pub gof: &'a mut [f32],
    /// Status code.
    pub status: &'a mut [u8],
}

/// Fit R2*, S0 and the quality maps of every voxel; `magnitude` has `E·N` elements,
/// echo-major (or voxel-major, see `options.layout`); `echo_times` [s] strictly increasing; `mask` N bytes or `None`.
pub fn fit_r2star_into(
    magnitude: &[f32],
    echo_times: &[f64],
    mask: Option<&[u8]>,
    options: &R2starOptions,
    out: R2starOutputs<'_>,
) -> CoreResult<()> {
    let needed = if options.method == R2starMethod::Arlo {
        3
    } else {
        2
    };
    check_echo_times(echo_times, needed)?;
    let n_echo = echo_times.len();
    let n = check_echo_major(
        magnitude.len(),
        n_echo,
        &[
            out.r2star.len(),
            out.s0.len(),
            out.sd.len(),
            out.gof.len(),
            out.status.len(),
        ],
    )?;
    if let Some(m) = mask {
        if m.len() != n {
            return Err(CoreError::ShapeMismatch(format!(
                "mask has {} elements, expected {n}",
                m.len()
            )));
        }
    }
    if let Some(s) = options.noise_sigma {
        if !(s.is_finite() && s > 0.0) {
            return Err(CoreError::InvalidArgument(format!(
                "noise_sigma must be a positive finite number, got {s}"
            )));
        }
    }
    let e = n_echo as f64;
    let t_mean = echo_times.iter().sum::<f64>() / e;
    let sxx: f64 = echo_times.iter().map(|t| (t - t_mean).powi(2)).sum();
    let slope_coef: Vec<f64> = echo_times.iter().map(|t| (t - t_mean) / sxx).collect();
    let intercept_coef: Vec<f64> = slope_coef.iter().map(|c| 1.0 / e - t_mean * c).collect();
    let simpson = simpson_weights(echo_times);

    out.r2star
        .par_chunks_mut(CHUNK)
        .zip(out.s0.par_chunks_mut(CHUNK))
        .zip(out.sd.par_chunks_mut(CHUNK))
        .zip(out.gof.par_chunks_mut(CHUNK))
        .zip(out.status.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each_init(Vec::new, |buffer, (chunk, ((((r2, s0), sd), gof), st))| {
            let start = chunk * CHUNK;
            let len = r2.len();
            let rows = Rows::of_chunk(magnitude, n_echo, options.layout, start, len, buffer);
            let mut bad = [false; CHUNK];
            let bad = &mut bad[..len];
            let mut not_converged = [false; CHUNK];
            match options.method {
                R2starMethod::LogLinear => {
                    fit_chunk_ols(rows, &slope_coef, &intercept_coef, r2, s0, bad)
                }
                R2starMethod::Weighted | R2starMethod::Nlls => {
                    fit_chunk_weighted(rows, echo_times, r2, s0, bad)
                }
                R2starMethod::Arlo => fit_chunk_arlo(rows, &simpson, echo_times, r2, s0, bad),
            }
            let rician_sigma = match options.method {
                R2starMethod::Nlls => options.noise_sigma,
                _ => None,
            };
            // Rician fits: residual sum and Fisher sums at each voxel's optimum, from the
            // last Levenberg–Marquardt pass (the Rician model is costly to re-evaluate).
            let mut lm_sums = Vec::new();
            if options.method == R2starMethod::Nlls {
                if rician_sigma.is_some() {
                    lm_sums.resize(len, [f64::NAN; 4]);
                }
                let mut y = vec![0.0f64; n_echo];
                for i in 0..len {
                    if bad[i] || mask.is_some_and(|m| m[start + i] == 0) {
                        continue;
                    }
                    for (k, yk) in y.iter_mut().enumerate() {
                        *yk = rows.row(k)[i] as f64;
                    }
                    let (s0_init, r_init) =
                        initial_guess(&y, echo_times, rician_sigma, s0[i], r2[i]);
                    let fit = levenberg_marquardt(
                        &y,
                        echo_times,
                        s0_init,
                        r_init,
                        rician_sigma,
                        options.max_iter,
                    );
                    s0[i] = fit.s0 as f32;
                    r2[i] = fit.r2star as f32;
                    not_converged[i] = !fit.converged;
                    if let Some(sums) = lm_sums.get_mut(i) {
                        let [aa, ab, bb] = fit.information;
                        *sums = [fit.rss, aa, ab, bb];
                    }
                }
            }
            match (options.quality, rician_sigma) {
                (false, _) => {
                    sd.fill(f32::NAN);
                    gof.fill(f32::NAN);
                }
                (true, None) => {
                    quality_gaussian(rows, echo_times, options.noise_sigma, r2, s0, sd, gof)
                }
                (true, Some(sigma)) => quality_rician(rows, n_echo, sigma, &lm_sums, sd, gof),
            }
            let chunk_mask = mask.map(|m| &m[start..start + len]);
            let nlls = options.method == R2starMethod::Nlls;
            let not_converged = nlls.then_some(&not_converged[..len]);
            finish_status(chunk_mask, bad, not_converged, r2, s0, st);
            for ((sd, gof), &code) in sd.iter_mut().zip(gof.iter_mut()).zip(st.iter()) {
                let ok = code == status::OK;
                *sd = if ok { *sd } else { f32::NAN };
                *gof = if ok { *gof } else { f32::NAN };
            }
        });
    Ok(())
}

/// Simpson weights `[w0, w1, w2]` of the integral over `[TE_i, TE_{i+2}]` of the quadratic
/// through three (possibly unevenly spaced) samples.
fn simpson_weights(echo_times: &[f64]) -> Vec<[f64; 3]> {
    echo_times
        .windows(3)
        .map(|w| {
            let (h0, h1) = (w[1] - w[0], w[2] - w[1]);
            let f = (h0 + h1) / 6.0;
            [
                f * (2.0 - h1 / h0),
                f * (h0 + h1) * (h0 + h1) / (h0 * h1),
                f * (2.0 - h0 / h1),
            ]
        })
        .collect()
}

avx2_dispatch!(fn fit_chunk_arlo / fit_chunk_arlo_avx2 => fit_chunk_arlo_body(
    rows: Rows<'_>, simpson: &[[f64; 3]], echo_times: &[f64], r2_out: &mut [f32],
    s0_out: &mut [f32], bad: &mut [bool]));

#[inline(always)]
fn fit_chunk_arlo_body(
    rows: Rows<'_>,
    simpson: &[[f64; 3]],
    echo_times: &[f64],
    r2_out: &mut [f32],
    s0_out: &mut [f32],
    bad: &mut [bool],
) {
    let len = r2_out.len();
    // Pei's estimating equation Σ (I_i − T2*·d_i)·(I_i + h_i·d_i) = 0, h_i = (TE_{i+2} − TE_i)/6
    // (ΔTE/3 for even spacing): unlike the plain regression slope Σ I·d / Σ d², it is not
    // biased by the noise in d when the decay across a triple is small (long T2*).
    // f32 arithmetic (4 SIMD lanes): the terms are products of magnitudes and echo-time
    // differences with no cancellation beyond that of d itself, which is exact data.
    let mut num = [0.0f32; CHUNK];
    let mut den = [0.0f32; CHUNK];
    let n_echo = echo_times.len();
    for k in n_echo - 2..n_echo {
        let row = &rows.row(k)[..len];
        for (b, &s) in bad[..len].iter_mut().zip(row) {
            *b |= not_loggable(s);
        }
    }
    for (k, w) in simpson.iter().enumerate() {
        let (a, b, c) = (
            &rows.row(k)[..len],
            &rows.row(k + 1)[..len],
            &rows.row(k + 2)[..len],
        );
        let h = ((echo_times[k + 2] - echo_times[k]) / 6.0) as f32;
        let (w0, w1, w2) = (w[0] as f32, w[1] as f32, w[2] as f32);
        let (num, den, bad) = (&mut num[..len], &mut den[..len], &mut bad[..len]);
        for i in 0..len {
            let (sa, sb, sc) = (a[i], b[i], c[i]);
            bad[i] |= not_loggable(sa);
            let integral = w0 * sa + w1 * sb + w2 * sc;
            let diff = sa - sc;
            let weight = integral + h * diff;
            num[i] += integral * weight;
            den[i] += diff * weight;
        }
    }
    for i in 0..len {
        // R2* = 1/T2*; a vanishing numerator (zero signal) gives ±∞ or NaN → status 2.
        r2_out[i] = den[i] / num[i];
    }
    linear_amplitude(rows, echo_times, r2_out, s0_out);
}

/// S0 = Σ S_k·e_k / Σ e_k² with e_k = exp(−R2*·TE_k): the least-squares amplitude.
#[inline(always)]
fn linear_amplitude(rows: Rows<'_>, echo_times: &[f64], r2: &[f32], s0_out: &mut [f32]) {
    let len = r2.len();
    let mut sye = [0.0f32; CHUNK];
    let mut see = [0.0f32; CHUNK];
    for (k, &t) in echo_times.iter().enumerate() {
        let row = &rows.row(k)[..len];
        let t = t as f32;
        let (sye, see) = (&mut sye[..len], &mut see[..len]);
        for i in 0..len {
            let e = exp_fast_f32(-r2[i] * t);
            sye[i] += row[i] * e;
            see[i] += e * e;
        }
    }
    for i in 0..len {
        s0_out[i] = sye[i] / see[i];
    }
}

/// exp(x) in f32 to ~2e-7 relative, branch-free (vectorises); x clamped to ±87 (the f32
/// range), NaN stays NaN.
#[inline(always)]
fn exp_fast_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: rounds and exposes the integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 87.0);
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let n_int = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    let r = (x - n * LN2_HI) - n * LN2_LO; // |r| ≤ ln2/2
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    p * f32::from_bits(n_int.wrapping_add(127) << 23)
}

avx2_dispatch!(fn quality_gaussian / quality_gaussian_avx2 => quality_gaussian_body(
    rows: Rows<'_>, echo_times: &[f64], noise_sigma: Option<f64>, r2: &[f32], s0: &[f32],
    sd: &mut [f32], gof: &mut [f32]));

/// R² and CRLB of the Gaussian model S0·exp(−R2*·TE), vectorised over the chunk (f64:
/// 4 lanes with AVX2).
#[inline(always)]
fn quality_gaussian_body(
    rows: Rows<'_>,
    echo_times: &[f64],
    noise_sigma: Option<f64>,
    r2: &[f32],
    s0: &[f32],
    sd: &mut [f32],
    gof: &mut [f32],
) {
    let len = r2.len();
    let mut rss = [0.0f64; CHUNK];
    let mut sy = [0.0f64; CHUNK];
    let mut syy = [0.0f64; CHUNK];
    let mut faa = [0.0f64; CHUNK];
    let mut fab = [0.0f64; CHUNK];
    let mut fbb = [0.0f64; CHUNK];
    for (k, &t) in echo_times.iter().enumerate() {
        let row = rows.row(k);
        for i in 0..len {
            let y = row[i] as f64;
            let e = exp_fast(-(r2[i] as f64) * t);
            let mu = s0[i] as f64 * e;
            let res = y - mu;
            rss[i] += res * res;
            sy[i] += y;
            syy[i] += y * y;
            let jr = -mu * t;
            faa[i] += e * e;
            fab[i] += e * jr;
            fbb[i] += jr * jr;
        }
    }
    finish_quality(
        echo_times.len(),
        noise_sigma,
        &rss[..len],
        &sy[..len],
        &syy[..len],
        &faa[..len],
        &fab[..len],
        &fbb[..len],
        sd,
        gof,
    );
}

/// R² and CRLB of the Rician first-moment model from the residual and Fisher sums
/// `[RSS, Σ(∂μ/∂S0)², Σ∂μ/∂S0·∂μ/∂R2*, Σ(∂μ/∂R2*)²]` of each voxel's final
/// Levenberg–Marquardt pass (at the f64 optimum that the f32 maps round).
fn quality_rician(
    rows: Rows<'_>,
    n_echo: usize,
    sigma: f64,
    lm_sums: &[[f64; 4]],
    sd: &mut [f32],
    gof: &mut [f32],
) {
    let len = rows.len;
    let mut sy = vec![0.0f64; len];
    let mut syy = vec![0.0f64; len];
    for k in 0..n_echo {
        let row = rows.row(k);
        for i in 0..len {
            let y = row[i] as f64;
            sy[i] += y;
            syy[i] += y * y;
        }
    }
    let column = |c: usize| lm_sums.iter().map(|s| s[c]).collect::<Vec<f64>>();
    let (rss, faa, fab, fbb) = (column(0), column(1), column(2), column(3));
    finish_quality(
        n_echo,
        Some(sigma),
        &rss,
        &sy,
        &syy,
        &faa,
        &fab,
        &fbb,
        sd,
        gof,
    );
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn finish_quality(
    n_echo: usize,
    noise_sigma: Option<f64>,
    rss: &[f64],
    sy: &[f64],
    syy: &[f64],
    faa: &[f64],
    fab: &[f64],
    fbb: &[f64],
    sd: &mut [f32],
    gof: &mut [f32],
) {
    let e = n_echo as f64;
    for i in 0..sd.len() {
        let tss = syy[i] - sy[i] * sy[i] / e;
        gof[i] = if tss > 0.0 {
            (1.0 - rss[i] / tss) as f32
        } else {
            f32::NAN
        };
        let variance = match noise_sigma {
            Some(s) => s * s,
            None if n_echo > 2 => rss[i] / (e - 2.0),
            None => f64::NAN,
        };
        let det = faa[i] * fbb[i] - fab[i] * fab[i];
        // [F⁻¹]_RR = σ²·Σ(∂μ/∂S0)² / det(JᵀJ).
        let var_r = variance * faa[i] / det;
        sd[i] = if det > 0.0 && var_r >= 0.0 {
            var_r.sqrt() as f32
        } else {
            f32::NAN
        };
    }
}

/// Model value and derivatives at one echo.
struct ModelPoint {
    mu: f64,
    d_s0: f64,
    d_r: f64,
}

#[inline(always)]
fn model(s0: f64, r2: f64, t: f64, rician_sigma: Option<f64>) -> ModelPoint {
    // exp_fast: ~1e-10 relative, inlined (the libm call dominated the Gaussian model).
    let e = exp_fast(-r2 * t);
    let a = s0 * e;
    let (mu, g) = match rician_sigma {
        None => (a, 1.0),
        Some(sigma) => rician_mean(a, sigma),
    };
    ModelPoint {
        mu,
        d_s0: g * e,
        d_r: -g * a * t,
    }
}

/// Rician first moment E[M] of a magnitude with true amplitude `a` and noise `sigma`,
/// and its derivative dE[M]/da.
///
/// With ν = a²/2σ² and the exponentially scaled Bessel functions at z = ν/2:
/// E[M] = σ√(π/2)·[(1+ν)·i0e(z) + ν·i1e(z)], dE[M]/da = √(π/2)·(a/2σ)·(i0e(z) + i1e(z)).
#[inline(always)]
pub fn rician_mean(a: f64, sigma: f64) -> (f64, f64) {
    const SQRT_HALF_PI: f64 = 1.253_314_137_315_500_3;
    // Reciprocals of σ (loop-invariant once inlined into the fit: hoisted out of it).
    let half_inv_var = 0.5 / (sigma * sigma);
    let half_inv_sigma = 0.5 / sigma;
    let nu = a * a * half_inv_var;
    let (i0, i1) = bessel_i0e_i1e(0.5 * nu);
    (
        sigma * SQRT_HALF_PI * ((1.0 + nu) * i0 + nu * i1),
        SQRT_HALF_PI * a * half_inv_sigma * (i0 + i1),
    )
}

/// Exponentially scaled modified Bessel functions e^{−x}·I0(x), e^{−x}·I1(x) for x ≥ 0,
/// by the polynomial approximations of Abramowitz & Stegun 9.8.1–9.8.4 (relative error
/// below ~1e-6).
#[inline(always)]
pub fn bessel_i0e_i1e(x: f64) -> (f64, f64) {
    if x < 3.75 {
        let t = (x / 3.75) * (x / 3.75);
        let i0 = 1.0
            + t * (3.515_622_9
                + t * (3.089_942_4
                    + t * (1.206_749_2 + t * (0.265_973_2 + t * (0.036_076_8 + t * 0.004_581_3)))));
        let i1 = x
            * (0.5
                + t * (0.878_905_94
                    + t * (0.514_988_69
                        + t * (0.150_849_34
                            + t * (0.026_587_33 + t * (0.003_015_32 + t * 0.000_324_11))))));
        let scale = exp_fast(-x);
        (i0 * scale, i1 * scale)
    } else {
        // One square root and one division: u = 3.75/x = 3.75·(1/√x)².
        let inv_root = 1.0 / x.sqrt();
        let u = 3.75 * inv_root * inv_root;
        let p0 = 0.398_942_28
            + u * (0.013_285_92
                + u * (0.002_253_19
                    + u * (-0.001_575_65
                        + u * (0.009_162_81
                            + u * (-0.020_577_06
                                + u * (0.026_355_37 + u * (-0.016_476_33 + u * 0.003_923_77)))))));
        let p1 = 0.398_942_28
            + u * (-0.039_880_24
                + u * (-0.003_620_18
                    + u * (0.001_638_01
                        + u * (-0.010_315_55
                            + u * (0.022_829_67
                                + u * (-0.028_953_12 + u * (0.017_876_54 - u * 0.004_200_59)))))));
        (p0 * inv_root, p1 * inv_root)
    }
}

/// Starting point for the nonlinear fit. Gaussian model: the chunk's weighted log-linear
/// estimate (`s0`, `r2`) when finite. Rician model: the weighted log-linear fit of the
/// amplitudes with the noise floor removed, A_k = √(y_k² − σ²) (the first moment is
/// ≈ √(A² + σ²) above the floor), which starts Levenberg–Marquardt next to the Rician
/// optimum instead of at the floor-biased plain fit. Fallback: a rate of 1/mean(TE)
/// scaled to the first echo.
fn initial_guess(
    y: &[f64],
    echo_times: &[f64],
    rician_sigma: Option<f64>,
    s0: f32,
    r2: f32,
) -> (f64, f64) {
    if let Some(sigma) = rician_sigma {
        if let Some(start) = weighted_loglinear_voxel(y, echo_times, sigma) {
            return start;
        }
    }
    if s0.is_finite() && r2.is_finite() && s0 > 0.0 {
        return (s0 as f64, r2 as f64);
    }
    let r = echo_times.len() as f64 / echo_times.iter().sum::<f64>().max(1e-6);
    (
        y[0].abs().max(f64::MIN_POSITIVE) * (r * echo_times[0]).exp(),
        r,
    )
}

/// (S0, R2*) of the S²-weighted log-linear fit of one voxel's amplitudes
/// √(y_k² − σ²) (echoes at or below σ get no weight); None when fewer than two echoes
/// carry weight or the result is not a finite positive S0.
fn weighted_loglinear_voxel(y: &[f64], echo_times: &[f64], sigma: f64) -> Option<(f64, f64)> {
    let t_mean = echo_times.iter().sum::<f64>() / echo_times.len() as f64;
    let (mut sw, mut swt, mut swtt, mut swy, mut swty) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut used = 0;
    for (&yk, &t) in y.iter().zip(echo_times) {
        let w = yk * yk - sigma * sigma;
        if w.is_nan() || w <= 0.0 {
            continue;
        }
        used += 1;
        let (l, t) = (0.5 * w.ln(), t - t_mean);
        sw += w;
        swt += w * t;
        swtt += w * t * t;
        swy += w * l;
        swty += w * t * l;
    }
    let det = sw * swtt - swt * swt;
    if used < 2 || det.is_nan() || det <= 1e-12 * sw * swtt {
        return None;
    }
    let slope = (sw * swty - swt * swy) / det;
    let s0 = ((swy - slope * swt) / sw - slope * t_mean).exp();
    (s0.is_finite() && s0 > 0.0 && slope.is_finite()).then_some((s0, -slope))
}

/// Result of one voxel's nonlinear fit.
#[derive(Debug, Clone, Copy)]
pub struct NllsVoxel {
    pub s0: f64,
    pub r2star: f64,
    pub converged: bool,
    pub iterations: usize,
    /// Residual sum of squares at (s0, r2star).
    pub rss: f64,
    /// JᵀJ at (s0, r2star): [Σ(∂μ/∂S0)², Σ∂μ/∂S0·∂μ/∂R2*, Σ(∂μ/∂R2*)²].
    pub information: [f64; 3],
}

/// Cost Σ(y − μ)² and the Gauss–Newton normal equations JᵀJ = [[aa, ab], [ab, bb]],
/// Jᵀr = [ga, gb] at one point, from one pass over the echoes: a trial point's pass
/// doubles as the next iteration's Jacobian when the step is accepted.
#[derive(Debug, Clone, Copy)]
struct NormalEquations {
    cost: f64,
    aa: f64,
    ab: f64,
    bb: f64,
    ga: f64,
    gb: f64,
}

impl NormalEquations {
    fn voxel(&self, s0: f64, r2star: f64, converged: bool, iterations: usize) -> NllsVoxel {
        NllsVoxel {
            s0,
            r2star,
            converged,
            iterations,
            rss: self.cost,
            information: [self.aa, self.ab, self.bb],
        }
    }
}

#[inline(always)]
fn normal_equations(
    y: &[f64],
    echo_times: &[f64],
    s0: f64,
    r2: f64,
    sigma: Option<f64>,
) -> NormalEquations {
    let mut ne = NormalEquations {
        cost: 0.0,
        aa: 0.0,
        ab: 0.0,
        bb: 0.0,
        ga: 0.0,
        gb: 0.0,
    };
    for (&yk, &t) in y.iter().zip(echo_times) {
        let m = model(s0, r2, t, sigma);
        let res = yk - m.mu;
        ne.cost += res * res;
        ne.aa += m.d_s0 * m.d_s0;
        ne.ab += m.d_s0 * m.d_r;
        ne.bb += m.d_r * m.d_r;
        ne.ga += m.d_s0 * res;
        ne.gb += m.d_r * res;
    }
    ne
}

/// Relative step below which Levenberg–Marquardt has converged.
const STEP_TOL: f64 = 1e-7;
/// Damping below which a step is trusted as the Gauss–Newton step (so a step below
/// STEP_TOL proves convergence before its trial point is evaluated).
const EARLY_EXIT_LAMBDA: f64 = 1e-2;

/// Levenberg–Marquardt on (S0, R2*) for one voxel, damping by diag(JᵀJ); steps that
/// make S0 non-positive or raise the cost are rejected. Converged when the accepted step
/// changes both parameters by less than 1e-7 relative (the maps are f32, whose rounding
/// is 6e-8: a tighter tolerance costs one more iteration and changes no output beyond
/// it) — checked before evaluating the trial point once the damping is small — or the
/// damping saturates (no
/// step lowers the cost: a minimum to working precision).
pub fn levenberg_marquardt(
    y: &[f64],
    echo_times: &[f64],
    s0_init: f64,
    r2_init: f64,
    rician_sigma: Option<f64>,
    max_iter: usize,
) -> NllsVoxel {
    let (mut s0, mut r2) = (s0_init, r2_init);
    let mut current = normal_equations(y, echo_times, s0, r2, rician_sigma);
    let mut lambda = 1e-3;
    for iteration in 1..=max_iter {
        let NormalEquations {
            aa, ab, bb, ga, gb, ..
        } = current;
        loop {
            let (daa, dbb) = (aa * (1.0 + lambda), bb * (1.0 + lambda));
            let det = daa * dbb - ab * ab;
            let step_s0 = (dbb * ga - ab * gb) / det;
            let step_r2 = (daa * gb - ab * ga) / det;
            let (new_s0, new_r2) = (s0 + step_s0, r2 + step_r2);
            let small = step_s0.abs() <= STEP_TOL * new_s0.abs()
                && step_r2.abs() <= STEP_TOL * new_r2.abs().max(1e-3);
            if small && lambda <= EARLY_EXIT_LAMBDA && iteration > 1 {
                // A (nearly undamped) Gauss–Newton step below the tolerance: converged
                // here, without simulating the trial point that would only confirm it
                // (one model pass of ~4 per voxel).
                return current.voxel(s0, r2, true, iteration);
            }
            let trial = if new_s0 > 0.0 && new_r2.is_finite() {
                normal_equations(y, echo_times, new_s0, new_r2, rician_sigma)
            } else {
                NormalEquations {
                    cost: f64::INFINITY,
                    ..current
                }
            };
            if trial.cost <= current.cost {
                s0 = new_s0;
                r2 = new_r2;
                current = trial;
                lambda = (lambda * 0.3).max(1e-12);
                if small {
                    return current.voxel(s0, r2, true, iteration);
                }
                break;
            }
            lambda *= 10.0;
            if lambda > 1e12 || !det.is_finite() {
                return current.voxel(s0, r2, current.cost.is_finite(), iteration);
            }
        }
    }
    current.voxel(s0, r2, false, max_iter)
}

#[cfg(test)]
mod tests;
#[cfg(feature = "timing")]
#[doc(hidden)]
pub mod timing;

//! Extended phase graphs (EPG) for multi-echo spin echo (CPMG) and the stimulated-echo
//! corrected T2 fit.
//!
//! Model: an ideal 90° excitation, then `n_echo` refocusing pulses of angle `B1·α` spaced
//! by the echo spacing ESP, in CPMG phase (refocusing axis along the excited
//! magnetization); transverse states decay with T2, longitudinal states with T1 between
//! pulses; echo k (at k·ESP) is the magnitude of the F₀ state.
//!
//! In CPMG phase every configuration state is real once the longitudinal states are
//! written as W = −i·Z, so the simulation runs in real arithmetic. The one term that
//! would break this — regrowth of longitudinal magnetization towards M0 — is left out: it
//! enters the echo in quadrature, so its effect on the echo magnitude is second order
//! (measured against a Bloch isochromat simulation in the tests: < 0.05 % for T1 = 1 s,
//! ESP = 10 ms, 32 echoes).
//!
//! Bookkeeping (what makes the simulation cheap): with dephasing counted in half echo
//! spacings, only odd orders 2j+1 are populated at the refocusing pulses and only even
//! orders at the echoes, so the simulator stores the pulse-time states F⁺₂ⱼ₊₁, F⁻₂ⱼ₊₁ and
//! W₂ⱼ₊₁ at index j, reads echo n as e^(−ESP/2T2)·F⁻₁ and moves every state by two orders
//! (one full echo spacing) between pulses. A state of index j at pulse n needs j more
//! echo spacings to reach F₀, so indices j > E−1−n are never updated: about E²/4 state
//! updates per train instead of E².
//!
//! The fit estimates T2 and B1 per voxel by Levenberg–Marquardt on the variable
//! projection cost (S0 eliminated in closed form: S0 = ⟨y, s⟩/⟨s, s⟩, Kaufman's Jacobian),
//! box bounds by projection, with the echoes' derivatives by forward-mode differentiation
//! of the simulation (value, ∂/∂T2 and ∂/∂B1 propagated together, structure of arrays).
//! The start is the best-correlated atom of a 96 (log T2) × 32 (B1) dictionary built once
//! per call (searched coarse to fine), moved to the vertex of the quadratic through the
//! correlations of its 3×3 grid neighbourhood. Stopping: negligible step or relative cost
//! decrease, or a Gauss–Newton promise below 10⁻³ of the noise variance estimated from the
//! residuals (a step of ~3 % of a standard deviation).
//! Because a refocusing angle of 180°+x gives the same echoes as 180°−x, B1 is bounded so
//! that B1·α ≤ 180°.

use crate::error::{CoreError, CoreResult};
use crate::grid::check_echo_major;
use crate::r2star::avx2_dispatch;
use rayon::prelude::*;

/// An echo amplitude with its derivatives with respect to T2 (`d_t2`, per s) and B1
/// (`d_b1`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Dual {
    pub v: f64,
    pub d_t2: f64,
    pub d_b1: f64,
}

/// Sequence parameters of a CPMG echo train.
#[derive(Debug, Clone, Copy)]
pub struct CpmgSequence {
    pub n_echo: usize,
    /// Echo spacing [s] (= first echo time).
    pub echo_spacing: f64,
    /// Nominal refocusing angle [degrees].
    pub refocusing_deg: f64,
    /// Longitudinal relaxation time used for the Z states [s].
    pub t1: f64,
}

impl CpmgSequence {
    /// Check the parameters; returns a message naming the bad one.
    pub fn validate(&self) -> CoreResult<()> {
        if self.n_echo < 3 {
            return Err(CoreError::TooFewEchoes {
                needed: 3,
                got: self.n_echo,
            });
        }
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !ok(self.echo_spacing) {
            return Err(CoreError::InvalidArgument(format!(
                "echo spacing must be a positive number of seconds, got {}",
                self.echo_spacing
            )));
        }
        if !(ok(self.refocusing_deg) && self.refocusing_deg <= 180.0) {
            return Err(CoreError::InvalidArgument(format!(
                "refocusing angle must be in (0, 180] degrees, got {}",
                self.refocusing_deg
            )));
        }
        if !ok(self.t1) {
            return Err(CoreError::InvalidArgument(format!(
                "T1 must be a positive number of seconds, got {}",
                self.t1
            )));
        }
        Ok(())
    }
}

/// Reusable state arrays of the simulator: values and the T2/B1 derivatives of the
/// pulse-time states F⁺, F⁻ and W at index j (order 2j+1), j = 0..=n_echo.
#[derive(Debug, Clone)]
pub struct EpgWork {
    /// [value, ∂T2, ∂B1] of F⁺.
    p: [Vec<f64>; 3],
    /// [value, ∂T2, ∂B1] of F⁻.
    m: [Vec<f64>; 3],
    /// [value, ∂T2, ∂B1] of W = −i·Z.
    w: [Vec<f64>; 3],
}

impl EpgWork {
    pub fn new(n_echo: usize) -> Self {
        let v = || vec![0.0; n_echo + 2];
        Self {
            p: [v(), v(), v()],
            m: [v(), v(), v()],
            w: [v(), v(), v()],
        }
    }
}

/// Per-train constants: relaxation over half and a full echo spacing, the refocusing
/// matrix entries (cos²(α/2), sin²(α/2), sin α, cos α) and their derivatives.
struct TrainConstants {
    e2h: f64,
    de2h: f64,
    e2: f64,
    de2: f64,
    e1: f64,
    rot: [f64; 4],
    drot: [f64; 4],
}

impl TrainConstants {
    fn new(seq: &CpmgSequence, t2: f64, b1: f64) -> Self {
        let half = 0.5 * seq.echo_spacing;
        let nominal = seq.refocusing_deg.to_radians();
        let alpha = b1 * nominal;
        let e2h = (-half / t2).exp();
        let e2 = e2h * e2h;
        let (sin_a, cos_a) = alpha.sin_cos();
        let (sin_h, cos_h) = (0.5 * alpha).sin_cos();
        Self {
            e2h,
            de2h: e2h * half / (t2 * t2),
            e2,
            de2: e2 * seq.echo_spacing / (t2 * t2),
            e1: (-seq.echo_spacing / seq.t1).exp(),
            rot: [cos_h * cos_h, sin_h * sin_h, sin_a, cos_a],
            drot: [
                -0.5 * sin_a * nominal,
                0.5 * sin_a * nominal,
                cos_a * nominal,
                -sin_a * nominal,
            ],
        }
    }
}

/// Echo amplitudes (S0 = 1, signed) without derivatives.
fn simulate_values(c: &TrainConstants, work: &mut EpgWork, echoes: &mut [f64]) {
    let n_echo = echoes.len();
    let [c2, s2, sin_a, cos_a] = c.rot;
    let half_sin = 0.5 * sin_a;
    let (p, m, w) = (&mut work.p[0], &mut work.m[0], &mut work.w[0]);
    p.fill(0.0);
    m.fill(0.0);
    w.fill(0.0);
    p[0] = c.e2h;
    let mut top = 0usize;
    for (n, echo) in echoes.iter_mut().enumerate() {
        top = top.min(n_echo - 1 - n);
        for ((pj, mj), wj) in p[..=top].iter_mut().zip(&mut m[..=top]).zip(&mut w[..=top]) {
            let (a, b, z) = (*pj, *mj, *wj);
            *pj = c2 * a + s2 * b + sin_a * z;
            *mj = s2 * a + c2 * b - sin_a * z;
            *wj = half_sin * (b - a) + cos_a * z;
        }
        *echo = c.e2h * m[0];
        if n + 1 == n_echo {
            break;
        }
        // One echo spacing: F⁺ up two orders (F⁻₁ becomes F⁺₁ through F₀), F⁻ down two.
        let f_minus_1 = m[0];
        p.copy_within(0..=top, 1);
        p[0] = f_minus_1;
        m.copy_within(1..=top + 1, 0);
        for x in &mut p[..=top + 1] {
            *x *= c.e2;
        }
        for x in &mut m[..=top] {
            *x *= c.e2;
        }
        for x in &mut w[..=top] {
            *x *= c.e1;
        }
        top += 1;
    }
}

/// Echo amplitudes (S0 = 1, signed) with their T2 and B1 derivatives.
///
/// One fused loop per refocusing pulse: the relaxation of the previous echo spacing is
/// applied as the states are loaded for the rotation (relaxing every state of the range
/// at once is what the separate passes did; the states past the range that they also
/// relaxed are never read again), and the shifts of F⁺ up and F⁻ down by one index are
/// moves of the arrays' origins (`p_at`, `m_at`) instead of copies. Same arithmetic in
/// the same order as the plain passes, so the same results.
#[inline(always)]
fn simulate_dual(c: &TrainConstants, work: &mut EpgWork, echoes: &mut [Dual]) {
    let n_echo = echoes.len();
    let [c2, s2, sin_a, cos_a] = c.rot;
    let [dc2, ds2, dsin_a, dcos_a] = c.drot;
    let half_sin = 0.5 * sin_a;
    let dhalf_sin = 0.5 * dsin_a;
    let EpgWork { p, m, w } = work;
    let span = 2 * n_echo + 2;
    for a in p.iter_mut().chain(m.iter_mut()).chain(w.iter_mut()) {
        a.clear();
        a.resize(span, 0.0);
    }
    let [pv, pt, pb] = p;
    let [mv, mt, mb] = m;
    let [wv, wt, wb] = w;
    // Logical F⁺ index j lives at p_at + j, F⁻ index j at m_at + j; p_at falls and m_at
    // (= n) rises by one per echo spacing, within 0..span.
    let mut p_at = n_echo + 1;
    pv[p_at] = c.e2h;
    pt[p_at] = c.de2h;
    // Relaxation factors to apply on load: none before the first pulse.
    let (mut e2, mut de2, mut e1) = (1.0, 0.0, 1.0);
    let mut top = 0usize;
    for (n, echo) in echoes.iter_mut().enumerate() {
        let m_at = n;
        top = top.min(n_echo - 1 - n);
        let len = top + 1;
        {
            // Equal-length slices so that the loop runs without bounds checks.
            let (pv, pt, pb) = (
                &mut pv[p_at..p_at + len],
                &mut pt[p_at..p_at + len],
                &mut pb[p_at..p_at + len],
            );
            let (mv, mt, mb) = (
                &mut mv[m_at..m_at + len],
                &mut mt[m_at..m_at + len],
                &mut mb[m_at..m_at + len],
            );
            let (wv, wt, wb) = (&mut wv[..len], &mut wt[..len], &mut wb[..len]);
            for j in 0..len {
                // Relaxation over the last echo spacing: ∂(e2·x)/∂T2 = e2·∂x/∂T2 + ∂e2/∂T2·x.
                let (a0, b0, z0) = (pv[j], mv[j], wv[j]);
                let (a, b, z) = (e2 * a0, e2 * b0, e1 * z0);
                let (at, bt, zt) = (e2 * pt[j] + de2 * a0, e2 * mt[j] + de2 * b0, e1 * wt[j]);
                let (ab, bb, zb) = (e2 * pb[j], e2 * mb[j], e1 * wb[j]);
                // B1 derivative: the rotation's own derivative acting on the values …
                let db_p = dc2 * a + ds2 * b + dsin_a * z;
                let db_m = ds2 * a + dc2 * b - dsin_a * z;
                let db_w = dhalf_sin * (b - a) + dcos_a * z;
                pv[j] = c2 * a + s2 * b + sin_a * z;
                mv[j] = s2 * a + c2 * b - sin_a * z;
                wv[j] = half_sin * (b - a) + cos_a * z;
                pt[j] = c2 * at + s2 * bt + sin_a * zt;
                mt[j] = s2 * at + c2 * bt - sin_a * zt;
                wt[j] = half_sin * (bt - at) + cos_a * zt;
                // … plus the rotation acting on the derivatives.
                pb[j] = c2 * ab + s2 * bb + sin_a * zb + db_p;
                mb[j] = s2 * ab + c2 * bb - sin_a * zb + db_m;
                wb[j] = half_sin * (bb - ab) + cos_a * zb + db_w;
            }
        }
        let (m0v, m0t, m0b) = (mv[m_at], mt[m_at], mb[m_at]);
        *echo = Dual {
            v: c.e2h * m0v,
            d_t2: c.e2h * m0t + c.de2h * m0v,
            d_b1: c.e2h * m0b,
        };
        if n + 1 == n_echo {
            break;
        }
        // One echo spacing: F⁺ up two orders (F⁻₁ becomes F⁺₁ through F₀), F⁻ down two.
        p_at -= 1;
        (pv[p_at], pt[p_at], pb[p_at]) = (m0v, m0t, m0b);
        (e2, de2, e1) = (c.e2, c.de2, c.e1);
        top += 1;
    }
}

/// Echo amplitudes of a CPMG train with S0 = 1 for `t2` [s] and B1 scale `b1`.
pub fn cpmg_echoes(seq: &CpmgSequence, t2: f64, b1: f64, work: &mut EpgWork, out: &mut [f64]) {
    simulate_values(&TrainConstants::new(seq, t2, b1), work, out);
    for e in out.iter_mut() {
        *e = e.abs();
    }
}

/// Echo amplitudes and their derivatives with respect to T2 and B1.
#[inline(always)]
pub fn cpmg_echoes_dual(
    seq: &CpmgSequence,
    t2: f64,
    b1: f64,
    work: &mut EpgWork,
    out: &mut [Dual],
) {
    simulate_dual(&TrainConstants::new(seq, t2, b1), work, out);
    for e in out.iter_mut() {
        if e.v < 0.0 {
            *e = Dual {
                v: -e.v,
                d_t2: -e.d_t2,
                d_b1: -e.d_b1,
            };
        }
    }
}

/// Echo trains (S0 = 1) of many voxels, echo-major `[E][N]`, in parallel; non-finite or
/// non-positive T2/B1 give NaN echoes.
pub fn cpmg_echo_trains(seq: &CpmgSequence, t2: &[f64], b1: &[f64]) -> CoreResult<Vec<f32>> {
    seq.validate()?;
    if t2.len() != b1.len() {
        return Err(CoreError::ShapeMismatch(format!(
            "{} T2 values but {} B1 values",
            t2.len(),
            b1.len()
        )));
    }
    let (n, e) = (t2.len(), seq.n_echo);
    let trains: Vec<Vec<f64>> = t2
        .par_iter()
        .zip(b1)
        .map_init(
            || EpgWork::new(e),
            |work, (&t, &b)| {
                let mut out = vec![f64::NAN; e];
                if t > 0.0 && b > 0.0 && t.is_finite() && b.is_finite() {
                    cpmg_echoes(seq, t, b, work, &mut out);
                }
                out
            },
        )
        .collect();
    let mut flat = vec![0.0f32; e * n];
    for (v, train) in trains.iter().enumerate() {
        for (k, x) in train.iter().enumerate() {
            flat[k * n + v] = *x as f32;
        }
    }
    Ok(flat)
}

/// Options of [`fit_t2_epg_into`].
#[derive(Debug, Clone, Copy)]
pub struct EpgFitOptions {
    pub sequence: CpmgSequence,
    /// Bounds on T2 [s].
    pub t2_bounds: (f64, f64),
    /// Lower bound on B1 (the upper bound is 180°/α, see the module notes).
    pub b1_min: f64,
    pub max_iter: usize,
}

/// Status codes of the EPG fit (same meanings as the R2* codes).
pub mod status {
    pub const OK: u8 = 0;
    pub const BAD_MAGNITUDE: u8 = 1;
    pub const DEGENERATE: u8 = 2;
    pub const OUTSIDE_MASK: u8 = 3;
    pub const NOT_CONVERGED: u8 = 4;
}

/// Per-voxel outputs of the EPG fit (length N each).
pub struct EpgOutputs<'a> {
    /// T2 [s].
    pub t2: &'a mut [f32],
    pub s0: &'a mut [f32],
    /// Refocusing-angle scale (actual/nominal).
    pub b1: &'a mut [f32],
    /// R² goodness of fit.
    pub gof: &'a mut [f32],
    pub status: &'a mut [u8],
}

/// Result of one voxel's EPG fit.
#[derive(Debug, Clone, Copy)]
pub struct EpgVoxel {
    pub s0: f64,
    pub t2: f64,
    pub b1: f64,
    pub rss: f64,
    pub converged: bool,
    /// Simulations with derivatives (Levenberg–Marquardt trial points, rejected steps
    /// included).
    pub evaluations: usize,
}

/// Unit-norm echo trains on a (log T2) × B1 grid, built once per fit call: the start of
/// every voxel's Levenberg–Marquardt is the atom with the largest correlation, refined
/// by a parabola through its grid neighbours.
struct Dictionary {
    log_t2: Vec<f64>,
    b1: Vec<f64>,
    /// `atoms[(i·n_b1 + j)·E + k]`: echo k of (t2[i], b1[j]) divided by its norm. f32 so
    /// that the search (the only per-voxel work proportional to the dictionary size)
    /// runs 8 lanes wide; the correlations near the peak differ by ≫ f32 precision.
    atoms: Vec<f32>,
    n_echo: usize,
}

impl Dictionary {
    const N_T2: usize = 96;
    const N_B1: usize = 32;
    /// Stride of the coarse search.
    const COARSE: usize = 4;

    fn new(seq: &CpmgSequence, t2_bounds: (f64, f64), b1_bounds: (f64, f64)) -> Self {
        let (lo, hi) = (t2_bounds.0.ln(), t2_bounds.1.ln());
        let log_t2: Vec<f64> = (0..Self::N_T2)
            .map(|i| lo + (hi - lo) * i as f64 / (Self::N_T2 - 1) as f64)
            .collect();
        let b1: Vec<f64> = (0..Self::N_B1)
            .map(|j| b1_bounds.0 + (b1_bounds.1 - b1_bounds.0) * j as f64 / (Self::N_B1 - 1) as f64)
            .collect();
        let e = seq.n_echo;
        let trains: Vec<Vec<f32>> = (0..Self::N_T2 * Self::N_B1)
            .into_par_iter()
            .map_init(
                || EpgWork::new(e),
                |work, a| {
                    let mut out = vec![0.0; e];
                    let t2 = log_t2[a / Self::N_B1].exp();
                    cpmg_echoes(seq, t2, b1[a % Self::N_B1], work, &mut out);
                    let norm = out.iter().map(|v| v * v).sum::<f64>().sqrt();
                    out.iter().map(|v| (v / norm) as f32).collect()
                },
            )
            .collect();
        Self {
            log_t2,
            b1,
            atoms: trains.into_iter().flatten().collect(),
            n_echo: e,
        }
    }

    /// (T2, B1) start for echoes `y` (f32 copy of the data); `corr` is scratch of
    /// N_T2·N_B1 entries. Coarse to fine: every COARSE-th atom first (and the last of
    /// each axis), then the fine atoms within COARSE−1 grid steps of the coarse best.
    #[inline(always)]
    fn start(&self, y: &[f32], corr: &mut [f32]) -> (f64, f64) {
        let e = self.n_echo;
        let mut best = (f32::NEG_INFINITY, 0usize, 0usize);
        let axis = |n: usize| {
            (0..n)
                .step_by(Self::COARSE)
                .chain(((n - 1) % Self::COARSE != 0).then_some(n - 1))
        };
        for i in axis(Self::N_T2) {
            for j in axis(Self::N_B1) {
                let a = i * Self::N_B1 + j;
                let c = dot_f32(&self.atoms[a * e..(a + 1) * e], y);
                if c > best.0 {
                    best = (c, i, j);
                }
            }
        }
        let reach = Self::COARSE - 1;
        let (ic, jc) = (best.1, best.2);
        let (i_lo, i_hi) = (ic.saturating_sub(reach), (ic + reach).min(Self::N_T2 - 1));
        let (j_lo, j_hi) = (jc.saturating_sub(reach), (jc + reach).min(Self::N_B1 - 1));
        for i in i_lo..=i_hi {
            for j in j_lo..=j_hi {
                let a = i * Self::N_B1 + j;
                corr[a] = dot_f32(&self.atoms[a * e..(a + 1) * e], y);
                if corr[a] > best.0 {
                    best = (corr[a], i, j);
                }
            }
        }
        let (i, j) = (best.1, best.2);
        // Neighbours of the fine best lie in the window unless the best is on its edge;
        // then they are computed here.
        let mut at = |i: usize, j: usize| {
            if !(i_lo..=i_hi).contains(&i) || !(j_lo..=j_hi).contains(&j) {
                let a = i * Self::N_B1 + j;
                corr[a] = dot_f32(&self.atoms[a * e..(a + 1) * e], y);
            }
            corr[i * Self::N_B1 + j] as f64
        };
        // Vertex of the parabola through three equally spaced samples, offset in grid
        // steps from the middle one (0 at the grid edge or when the samples are flat).
        let vertex = |lo: f64, mid: f64, hi: f64| {
            let curvature = lo - 2.0 * mid + hi;
            if curvature < 0.0 {
                (0.5 * (lo - hi) / curvature).clamp(-0.5, 0.5)
            } else {
                0.0
            }
        };
        let inner_i = i > 0 && i + 1 < Self::N_T2;
        let inner_j = j > 0 && j + 1 < Self::N_B1;
        let (mut di, mut dj) = (0.0, 0.0);
        if inner_i && inner_j {
            // Quadratic through the 3×3 neighbourhood (central differences, with the
            // cross term: T2 and B1 are strongly correlated in CPMG trains), vertex by one
            // Newton step when the surface is concave; else separate parabolas.
            let c = at(i, j);
            let (t_lo, t_hi) = (at(i - 1, j), at(i + 1, j));
            let (b_lo, b_hi) = (at(i, j - 1), at(i, j + 1));
            let cross =
                0.25 * (at(i + 1, j + 1) - at(i + 1, j - 1) - at(i - 1, j + 1) + at(i - 1, j - 1));
            let (gt, gb) = (0.5 * (t_hi - t_lo), 0.5 * (b_hi - b_lo));
            let (htt, hbb) = (t_lo - 2.0 * c + t_hi, b_lo - 2.0 * c + b_hi);
            let det = htt * hbb - cross * cross;
            if htt < 0.0 && det > 0.0 {
                di = ((-gt * hbb + gb * cross) / det).clamp(-1.0, 1.0);
                dj = ((-gb * htt + gt * cross) / det).clamp(-1.0, 1.0);
            } else {
                di = vertex(t_lo, c, t_hi);
                dj = vertex(b_lo, c, b_hi);
            }
        } else if inner_i {
            let (lo, mid, hi) = (at(i - 1, j), at(i, j), at(i + 1, j));
            di = vertex(lo, mid, hi);
        } else if inner_j {
            let (lo, mid, hi) = (at(i, j - 1), at(i, j), at(i, j + 1));
            dj = vertex(lo, mid, hi);
        }
        let step_t2 = self.log_t2[1] - self.log_t2[0];
        let step_b1 = self.b1[1] - self.b1[0];
        // The top of the B1 range is B1·α = 180°, where every echo's B1 derivative
        // vanishes (the trains are symmetric about it): a start there would never move,
        // so the start stays a quarter grid step below it.
        let b1_top = self.b1[Self::N_B1 - 1] - 0.25 * step_b1;
        (
            (self.log_t2[i] + di * step_t2).exp(),
            (self.b1[j] + dj * step_b1).min(b1_top),
        )
    }
}

/// Dot product in 8 independent lanes (vectorisable; f32 sums are not reassociated).
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(u, v)| u * v)
        .sum();
    for (u, v) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Variable-projection quantities of one simulated train for data `y`.
struct Projection {
    /// Closed-form S0 = ⟨y, s⟩/⟨s, s⟩.
    s0: f64,
    rss: f64,
    /// Gauss–Newton matrix and gradient in (T2, B1) (Kaufman's approximation).
    a: [[f64; 2]; 2],
    g: [f64; 2],
}

#[inline(always)]
fn project(y: &[f64], s: &[Dual]) -> Option<Projection> {
    let (mut ss, mut ys) = (0.0, 0.0);
    let (mut st, mut sb) = (0.0, 0.0);
    let (mut tt, mut tb, mut bb) = (0.0, 0.0, 0.0);
    let (mut yt, mut yb) = (0.0, 0.0);
    for (&yk, e) in y.iter().zip(s) {
        ss += e.v * e.v;
        ys += yk * e.v;
        st += e.v * e.d_t2;
        sb += e.v * e.d_b1;
        tt += e.d_t2 * e.d_t2;
        tb += e.d_t2 * e.d_b1;
        bb += e.d_b1 * e.d_b1;
        yt += yk * e.d_t2;
        yb += yk * e.d_b1;
    }
    if !(ss > 0.0 && ys > 0.0 && ss.is_finite() && ys.is_finite()) {
        return None;
    }
    let s0 = ys / ss;
    // Explicit residual sum (|y|² − ⟨y,s⟩²/⟨s,s⟩ cancels catastrophically near a perfect fit).
    let rss: f64 = y
        .iter()
        .zip(s)
        .map(|(&yk, e)| (yk - s0 * e.v).powi(2))
        .sum();
    let c2 = s0 * s0;
    Some(Projection {
        s0,
        rss,
        a: [
            [c2 * (tt - st * st / ss), c2 * (tb - st * sb / ss)],
            [c2 * (tb - st * sb / ss), c2 * (bb - sb * sb / ss)],
        ],
        // ⟨∂s, r⟩ with r = y − S0·s.
        g: [s0 * (yt - s0 * st), s0 * (yb - s0 * sb)],
    })
}

struct VoxelFitter {
    seq: CpmgSequence,
    t2_bounds: (f64, f64),
    b1_bounds: (f64, f64),
    max_iter: usize,
    work: EpgWork,
    trial_train: Vec<Dual>,
    y32: Vec<f32>,
    corr: Vec<f32>,
    evaluations: usize,
}

impl VoxelFitter {
    fn new(opts: &EpgFitOptions) -> Self {
        let n = opts.sequence.n_echo;
        let b1_max = 180.0 / opts.sequence.refocusing_deg;
        Self {
            seq: opts.sequence,
            t2_bounds: opts.t2_bounds,
            b1_bounds: (opts.b1_min.min(b1_max), b1_max),
            max_iter: opts.max_iter,
            work: EpgWork::new(n),
            trial_train: vec![Dual::default(); n],
            y32: vec![0.0; n],
            corr: vec![0.0; Dictionary::N_T2 * Dictionary::N_B1],
            evaluations: 0,
        }
    }

    /// Simulate (T2, B1) with derivatives into the trial train and project the data.
    #[inline(always)]
    fn evaluate(&mut self, y: &[f64], t2: f64, b1: f64) -> Option<Projection> {
        self.evaluations += 1;
        cpmg_echoes_dual(&self.seq, t2, b1, &mut self.work, &mut self.trial_train);
        project(y, &self.trial_train)
    }

    #[inline(always)]
    fn fit(&mut self, y: &[f64], dictionary: &Dictionary) -> EpgVoxel {
        self.evaluations = 0;
        for (a, &b) in self.y32.iter_mut().zip(y) {
            *a = b as f32;
        }
        let (t2, b1) = dictionary.start(&self.y32, &mut self.corr);
        let mut t2 = t2.clamp(self.t2_bounds.0, self.t2_bounds.1);
        let mut b1 = b1.clamp(self.b1_bounds.0, self.b1_bounds.1);
        // Trial points are simulated with derivatives, so an accepted step's projection
        // holds the next iteration's normal equations (one simulation per iteration).
        let Some(mut current) = self.evaluate(y, t2, b1) else {
            return self.finish(f64::NAN, t2, b1, f64::NAN, false);
        };
        let mut lambda = 1e-3;
        let dof = (y.len() as f64 - 3.0).max(1.0);
        for _ in 0..self.max_iter {
            let (a, g) = (current.a, current.g);
            let floor = 1e-12 * (a[0][0] + a[1][1]);
            // Stop before simulating another trial point when even the undamped
            // Gauss–Newton step promises a statistically negligible decrease (see
            // NOISE_TOL); with B1 on a bound and the step pointing out, only T2 can move.
            let promised = gauss_newton_decrease(a, g, b1, self.b1_bounds);
            if promised <= NOISE_TOL * current.rss / dof {
                return self.finish(current.s0, t2, b1, current.rss, true);
            }
            loop {
                let det = |m: [[f64; 2]; 2]| m[0][0] * m[1][1] - m[0][1] * m[1][0];
                let mut m = a;
                m[0][0] += lambda * (a[0][0] + floor);
                m[1][1] += lambda * (a[1][1] + floor);
                let d = det(m);
                if !(d.is_finite() && d.abs() > 0.0) {
                    lambda *= 10.0;
                    if lambda > 1e12 {
                        return self.finish(current.s0, t2, b1, current.rss, true);
                    }
                    continue;
                }
                let step = [
                    (g[0] * m[1][1] - g[1] * m[0][1]) / d,
                    (g[1] * m[0][0] - g[0] * m[1][0]) / d,
                ];
                let new_t2 = (t2 + step[0]).clamp(self.t2_bounds.0, self.t2_bounds.1);
                let new_b1 = (b1 + step[1]).clamp(self.b1_bounds.0, self.b1_bounds.1);
                let trial = self.evaluate(y, new_t2, new_b1);
                match trial {
                    Some(trial) if trial.rss <= current.rss => {
                        // Converged on a negligible step, or on a negligible decrease of
                        // the cost (needed at B1·α = 180°, where the echoes depend on B1
                        // only to second order and Gauss–Newton steps shrink slowly).
                        // Or when the decrease is statistically negligible: below
                        // NOISE_TOL·σ² (σ² = RSS/(E−3)), i.e. a step of ~3 % of a standard
                        // deviation; noiseless data have σ² → 0, so this never stops them early.
                        let decrease = current.rss - trial.rss;
                        let small = ((new_t2 - t2).abs() <= STEP_TOL * new_t2
                            && (new_b1 - b1).abs() <= STEP_TOL)
                            || decrease <= COST_TOL * current.rss
                            || decrease <= NOISE_TOL * trial.rss / dof;
                        t2 = new_t2;
                        b1 = new_b1;
                        current = trial;
                        lambda = (lambda * 0.3).max(1e-12);
                        if small {
                            return self.finish(current.s0, t2, b1, current.rss, true);
                        }
                        break;
                    }
                    _ => {
                        lambda *= 10.0;
                        if lambda > 1e12 {
                            return self.finish(current.s0, t2, b1, current.rss, true);
                        }
                    }
                }
            }
        }
        self.finish(current.s0, t2, b1, current.rss, false)
    }

    fn finish(&self, s0: f64, t2: f64, b1: f64, rss: f64, converged: bool) -> EpgVoxel {
        EpgVoxel {
            s0,
            t2,
            b1,
            rss,
            converged,
            evaluations: self.evaluations,
        }
    }
}

/// Decrease of the residual sum of squares that the undamped Gauss–Newton step of the
/// normal equations (a, g) promises; with B1 at a bound and the step leaving the box, the
/// decrease of the T2-only step. Infinite when the system is singular.
fn gauss_newton_decrease(a: [[f64; 2]; 2], g: [f64; 2], b1: f64, b1_bounds: (f64, f64)) -> f64 {
    let det = a[0][0] * a[1][1] - a[0][1] * a[1][0];
    if !(det.is_finite() && det > 0.0) {
        return f64::INFINITY;
    }
    let step_b1 = (g[1] * a[0][0] - g[0] * a[1][0]) / det;
    let blocked = (b1 >= b1_bounds.1 && step_b1 > 0.0) || (b1 <= b1_bounds.0 && step_b1 < 0.0);
    if blocked {
        if a[0][0] > 0.0 {
            g[0] * g[0] / a[0][0]
        } else {
            f64::INFINITY
        }
    } else {
        // gᵀA⁻¹g
        (g[0] * g[0] * a[1][1] - 2.0 * g[0] * g[1] * a[0][1] + g[1] * g[1] * a[0][0]) / det
    }
}

/// Relative parameter step and relative cost decrease at which the EPG fit stops. Looser
/// values (1e-6/1e-7) save little time and leave B1 0.55 % off in noiseless data near
/// B1·α = 180°, where the cost is flat to fourth order in B1.
const STEP_TOL: f64 = 1e-9;
const COST_TOL: f64 = 1e-8;
/// Promised or achieved decrease, relative to the residual noise variance, below which
/// further iterations cannot change the estimate by more than ~3 % of its standard
/// deviation (10⁻² would save another 0.3 simulations per voxel).
const NOISE_TOL: f64 = 1e-3;

/// One chunk's slices of the output maps.
struct ChunkMaps<'a> {
    t2: &'a mut [f32],
    s0: &'a mut [f32],
    b1: &'a mut [f32],
    gof: &'a mut [f32],
    status: &'a mut [u8],
}

avx2_dispatch!(fn fit_chunk / fit_chunk_avx2 => fit_chunk_body(magnitude: &[f32],
    mask: Option<&[u8]>, options: &EpgFitOptions, dictionary: &Dictionary, first: usize,
    maps: ChunkMaps<'_>));

/// Fit the voxels `first..first + maps.t2.len()`; compiled with AVX2 where the CPU has
/// it (the simulation's state updates and the dictionary search vectorise 4/8 wide).
#[inline(always)]
fn fit_chunk_body(
    magnitude: &[f32],
    mask: Option<&[u8]>,
    options: &EpgFitOptions,
    dictionary: &Dictionary,
    first: usize,
    maps: ChunkMaps<'_>,
) {
    let ChunkMaps {
        t2,
        s0,
        b1,
        gof,
        status: st,
    } = maps;
    let n_echo = options.sequence.n_echo;
    let n = magnitude.len() / n_echo;
    let mut fitter = VoxelFitter::new(options);
    let mut y = vec![0.0f64; n_echo];
    for i in 0..t2.len() {
        let v = first + i;
        let nan = f32::NAN;
        (t2[i], s0[i], b1[i], gof[i]) = (nan, nan, nan, nan);
        if mask.is_some_and(|m| m[v] == 0) {
            st[i] = status::OUTSIDE_MASK;
            continue;
        }
        let mut ok = true;
        for (k, yk) in y.iter_mut().enumerate() {
            let s = magnitude[k * n + v];
            ok &= s.is_finite() && s > 0.0;
            *yk = s as f64;
        }
        if !ok {
            st[i] = status::BAD_MAGNITUDE;
            continue;
        }
        let fit = fitter.fit(&y, dictionary);
        let mean = y.iter().sum::<f64>() / n_echo as f64;
        let tss: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
        if !(fit.t2.is_finite() && fit.s0.is_finite() && fit.b1.is_finite()) {
            st[i] = status::DEGENERATE;
            continue;
        }
        if !fit.converged {
            st[i] = status::NOT_CONVERGED;
            continue;
        }
        st[i] = status::OK;
        t2[i] = fit.t2 as f32;
        s0[i] = fit.s0 as f32;
        b1[i] = fit.b1 as f32;
        gof[i] = if tss > 0.0 {
            (1.0 - fit.rss / tss) as f32
        } else {
            f32::NAN
        };
    }
}

/// Fit S0, T2 and B1 of every voxel; `magnitude` echo-major `[E][N]` with E =
/// `options.sequence.n_echo` echoes at k·ESP; `mask` N bytes or None.
pub fn fit_t2_epg_into(
    magnitude: &[f32],
    mask: Option<&[u8]>,
    options: &EpgFitOptions,
    out: EpgOutputs<'_>,
) -> CoreResult<()> {
    options.sequence.validate()?;
    let (t2_lo, t2_hi) = options.t2_bounds;
    if !(t2_lo > 0.0 && t2_hi > t2_lo && t2_hi.is_finite()) {
        return Err(CoreError::InvalidArgument(format!(
            "T2 bounds must satisfy 0 < low < high, got {:?}",
            options.t2_bounds
        )));
    }
    if !(options.b1_min > 0.0 && options.b1_min.is_finite()) {
        return Err(CoreError::InvalidArgument(format!(
            "b1_min must be positive, got {}",
            options.b1_min
        )));
    }
    let n_echo = options.sequence.n_echo;
    let n = check_echo_major(
        magnitude.len(),
        n_echo,
        &[
            out.t2.len(),
            out.s0.len(),
            out.b1.len(),
            out.gof.len(),
            out.status.len(),
        ],
    )?;
    if mask.is_some_and(|m| m.len() != n) {
        return Err(CoreError::ShapeMismatch(format!(
            "mask must have {n} elements"
        )));
    }
    const CHUNK: usize = 256;
    let dictionary = {
        let f = VoxelFitter::new(options);
        Dictionary::new(&options.sequence, f.t2_bounds, f.b1_bounds)
    };
    out.t2
        .par_chunks_mut(CHUNK)
        .zip(out.s0.par_chunks_mut(CHUNK))
        .zip(out.b1.par_chunks_mut(CHUNK))
        .zip(out.gof.par_chunks_mut(CHUNK))
        .zip(out.status.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(chunk, ((((t2, s0), b1), gof), st))| {
            let maps = ChunkMaps {
                t2,
                s0,
                b1,
                gof,
                status: st,
            };
            fit_chunk(magnitude, mask, options, &dictionary, chunk * CHUNK, maps);
        });
    Ok(())
}

#[cfg(test)]
mod tests {
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
}

/// Per-part CPU times of the fit (the machine is shared, so thread CPU time, not wall):
/// `cargo test --release -p alsiron-core epg_parts_timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;
    /// Seconds this thread has been on a CPU (the machine is shared; wall time is not).
    use crate::test_support::thread_cpu_seconds as cpu;
    #[test]
    #[ignore]
    fn epg_parts_timing() {
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
}

//! The stimulated-echo corrected T2 fit: dictionary start, variable-projection
//! Levenberg–Marquardt per voxel, chunked over the volume (see the parent module notes).

use super::*;
use crate::error::{CoreError, CoreResult};
use crate::grid::check_echo_major;
use crate::relax::r2star::avx2_dispatch;

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
pub(super) struct Dictionary {
    log_t2: Vec<f64>,
    b1: Vec<f64>,
    /// `atoms[(i·n_b1 + j)·E + k]`: echo k of (t2[i], b1[j]) divided by its norm. f32 so
    /// that the search (the only per-voxel work proportional to the dictionary size)
    /// runs 8 lanes wide; the correlations near the peak differ by ≫ f32 precision.
    atoms: Vec<f32>,
    n_echo: usize,
}

impl Dictionary {
    pub(super) const N_T2: usize = 96;
    pub(super) const N_B1: usize = 32;
    /// Stride of the coarse search.
    const COARSE: usize = 4;

    pub(super) fn new(seq: &CpmgSequence, t2_bounds: (f64, f64), b1_bounds: (f64, f64)) -> Self {
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
    pub(super) fn start(&self, y: &[f32], corr: &mut [f32]) -> (f64, f64) {
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
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) struct Projection {
    /// Closed-form S0 = ⟨y, s⟩/⟨s, s⟩.
    s0: f64,
    rss: f64,
    /// Gauss–Newton matrix and gradient in (T2, B1) (Kaufman's approximation).
    a: [[f64; 2]; 2],
    g: [f64; 2],
}

#[inline(always)]
pub(super) fn project(y: &[f64], s: &[Dual]) -> Option<Projection> {
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

pub(super) struct VoxelFitter {
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
    pub(super) fn new(opts: &EpgFitOptions) -> Self {
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
    pub(super) fn fit(&mut self, y: &[f64], dictionary: &Dictionary) -> EpgVoxel {
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
pub(super) fn gauss_newton_decrease(
    a: [[f64; 2]; 2],
    g: [f64; 2],
    b1: f64,
    b1_bounds: (f64, f64),
) -> f64 {
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
pub(super) const STEP_TOL: f64 = 1e-9;
pub(super) const COST_TOL: f64 = 1e-8;
/// Promised or achieved decrease, relative to the residual noise variance, below which
/// further iterations cannot change the estimate by more than ~3 % of its standard
/// deviation (10⁻² would save another 0.3 simulations per voxel).
pub(super) const NOISE_TOL: f64 = 1e-3;

/// One chunk's slices of the output maps.
pub(super) struct ChunkMaps<'a> {
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
pub(super) fn fit_chunk_body(
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

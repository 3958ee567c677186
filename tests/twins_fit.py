"""Plain NumPy twins (slow, obviously correct) of the unwrapping, field and R2* kernels.

They follow the algorithms described in alsiron/fieldmap.py and alsiron/relax.py
directly, in float64, without any of the Rust kernels' speed tricks (quantised costs,
fast log/exp, chunking), so agreement checks the tricks as well as the maths.
"""

from __future__ import annotations

import heapq

import numpy as np

TWO_PI = 2.0 * np.pi


def wrap(x: np.ndarray) -> np.ndarray:
    """Wrap angles [rad] to [−π, π]."""
    return x - TWO_PI * np.round(x / TWO_PI)


def edge_quality(phase: np.ndarray, magnitude: np.ndarray | None, mask: np.ndarray
                 ) -> list[np.ndarray]:
    """Quality in [0, 1] of the forward edge along each axis (same definition as Rust)."""
    active = (mask != 0) & np.isfinite(phase)
    m_ref = 1.0
    if magnitude is not None:
        active &= np.isfinite(magnitude)
        vals = np.sort(np.abs(magnitude[active]).ravel())
        if vals.size:
            ref = vals[min(vals.size * 9 // 10, vals.size - 1)]
            m_ref = ref if ref > 0 else 1.0
    qualities = []
    for axis in range(3):
        n = phase.shape[axis]
        a = np.take(phase, np.arange(n - 1), axis=axis).astype(np.float64)
        b = np.take(phase, np.arange(1, n), axis=axis).astype(np.float64)
        q = 1.0 - np.abs(wrap(b - a)) / np.pi
        if magnitude is not None:
            ma = np.abs(np.take(magnitude, np.arange(n - 1), axis=axis)).astype(np.float64)
            mb = np.abs(np.take(magnitude, np.arange(1, n), axis=axis)).astype(np.float64)
            lo, hi = np.minimum(ma, mb), np.maximum(ma, mb)
            with np.errstate(invalid="ignore", divide="ignore"):
                coherence = np.where(hi > 0, lo / hi, 0.0)
            q = q * coherence * np.minimum(lo / m_ref, 1.0)
        qualities.append(np.clip(q, 0.0, 1.0))
    return qualities


def unwrap_reference(phase: np.ndarray, magnitude: np.ndarray | None = None,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """Quality-guided region growing with a binary heap (float qualities, no bins).

    Each connected part of the mask starts from the voxel with the best summed edge
    quality; unreached voxels keep their input value. Slow: small volumes only.
    """
    phase = np.asarray(phase, dtype=np.float64)
    mask = np.ones(phase.shape, bool) if mask is None else np.asarray(mask) != 0
    active = mask & np.isfinite(phase)
    if magnitude is not None:
        active &= np.isfinite(magnitude)
    qualities = edge_quality(phase, magnitude, mask)
    shape = phase.shape
    out = phase.copy()
    done = np.zeros(shape, bool)

    def neighbours(v):
        for axis in range(3):
            for step in (-1, 1):
                u = list(v)
                u[axis] += step
                if 0 <= u[axis] < shape[axis]:
                    u = tuple(u)
                    if active[u]:
                        lo = list(min(v, u))
                        q = qualities[axis][tuple(lo)]
                        yield u, q

    score = np.zeros(shape)
    for v in zip(*np.nonzero(active), strict=True):
        score[v] = sum(q for _, q in neighbours(v))
    order = sorted(zip(*np.nonzero(active), strict=True), key=lambda v: -score[v])
    for seed in order:
        if done[seed]:
            continue
        done[seed] = True
        heap = [(-q, u, seed) for u, q in neighbours(seed) if not done[u]]
        heapq.heapify(heap)
        while heap:
            _, t, s = heapq.heappop(heap)
            if done[t]:
                continue
            out[t] = phase[t] + TWO_PI * np.round((out[s] - phase[t]) / TWO_PI)
            done[t] = True
            for u, q in neighbours(t):
                if not done[u]:
                    heapq.heappush(heap, (-q, u, t))
    return out


def fit_field_reference(magnitude: np.ndarray, phase: np.ndarray, echo_times,
                        unwrapped_pair_difference: np.ndarray, mask: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2–4 of the field fit, given the spatially unwrapped pair difference [rad].

    ``unwrapped_pair_difference`` is the unwrapped phase of S_{p+1}·conj(S_p) for the
    closest echo pair p (already centred); returns (ω [rad/s], φ0 [rad], residual [rad])
    with NaN outside the mask.
    """
    tes = np.asarray(echo_times, dtype=np.float64)
    p = int(np.argmin(np.diff(tes)))
    omega0 = unwrapped_pair_difference.astype(np.float64) / (tes[p + 1] - tes[p])
    ph = phase.astype(np.float64)
    w = magnitude.astype(np.float64) ** 2
    phi0 = wrap(ph[0] - omega0 * tes[0])
    t = tes[:, None, None, None]
    predicted = phi0[None] + omega0[None] * t
    y = ph + TWO_PI * np.round((predicted - ph) / TWO_PI) - phi0[None]
    omega = (w * t * y).sum(0) / (w * t * t).sum(0)
    residual = np.sqrt((w * (y - omega[None] * t) ** 2).sum(0) / w.sum(0))
    outside = mask == 0
    for a in (omega, phi0, residual):
        a[outside] = np.nan
    return omega, phi0, residual


def pair_difference(magnitude: np.ndarray, phase: np.ndarray, echo_times
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Wrapped phase and magnitude of S_{p+1}·conj(S_p) for the closest echo pair."""
    p = int(np.argmin(np.diff(np.asarray(echo_times, dtype=np.float64))))
    s_a = magnitude[p] * np.exp(1j * phase[p].astype(np.float64))
    s_b = magnitude[p + 1] * np.exp(1j * phase[p + 1].astype(np.float64))
    product = s_b * np.conj(s_a)
    return np.angle(product), np.sqrt(np.abs(product))


def centre(values: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift by the multiple of 2π bringing the weighted mean over ``mask`` closest to 0."""
    w = weights[mask != 0].astype(np.float64) ** 2
    mean = np.sum(w * values[mask != 0]) / np.sum(w)
    return values - TWO_PI * np.round(mean / TWO_PI)


def r2star_loglinear_reference(magnitude: np.ndarray, echo_times, weighted: bool = False
                               ) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) least squares of ln S on TE per voxel, float64, via lstsq.

    ``magnitude`` is (E, N); returns (R2* [s⁻¹], S0) of length N; NaN where any echo is
    not positive and finite.
    """
    tes = np.asarray(echo_times, dtype=np.float64)
    mag = magnitude.astype(np.float64)
    n = mag.shape[1]
    r2 = np.full(n, np.nan)
    s0 = np.full(n, np.nan)
    design = np.stack([np.ones_like(tes), tes], axis=1)
    for i in range(n):
        s = mag[:, i]
        if not np.all(np.isfinite(s) & (s > 0)):
            continue
        w = s if weighted else np.ones_like(s)  # sqrt of weights S²
        coef, *_ = np.linalg.lstsq(design * w[:, None], np.log(s) * w, rcond=None)
        s0[i], r2[i] = np.exp(coef[0]), -coef[1]
    return r2, s0


def r2star_loglinear_vectorised(magnitude: np.ndarray, echo_times, weighted: bool = False
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Float32 vectorised closed-form log-linear fit of (E, N) data (the bench baseline)."""
    tes = np.asarray(echo_times, dtype=np.float32)[:, None]
    y = np.log(magnitude)
    w = magnitude * magnitude if weighted else np.ones_like(magnitude)
    sw = w.sum(0)
    swt = (w * tes).sum(0)
    swtt = (w * tes * tes).sum(0)
    swy = (w * y).sum(0)
    swty = (w * tes * y).sum(0)
    det = sw * swtt - swt * swt
    slope = (sw * swty - swt * swy) / det
    intercept = (swy - slope * swt) / sw
    return -slope, np.exp(intercept)


# ----------------------------------------------------------------- R2* fitters (relax)
def simpson_integral(t: np.ndarray, s: np.ndarray) -> float:
    """Integral over [t0, t2] of the quadratic through three samples (numpy polyfit)."""
    poly = np.polyint(np.polyfit(t, s, 2))
    return float(np.polyval(poly, t[2]) - np.polyval(poly, t[0]))


def r2star_arlo_reference(magnitude: np.ndarray, echo_times) -> tuple[np.ndarray, np.ndarray]:
    """ARLO per voxel: T2* = Σ(I_i² + h_i·I_i·d_i) / Σ(h_i·d_i² + I_i·d_i) with I_i the
    quadratic integral over [TE_i, TE_{i+2}], d_i = S_i − S_{i+2}, h_i = (TE_{i+2}−TE_i)/6
    (Pei 2015, ΔTE/3 for even spacing); S0 the least-squares amplitude."""
    tes = np.asarray(echo_times, dtype=np.float64)
    mag = magnitude.astype(np.float64)
    n = mag.shape[1]
    r2 = np.full(n, np.nan)
    s0 = np.full(n, np.nan)
    for v in range(n):
        s = mag[:, v]
        if not np.all(np.isfinite(s) & (s > 0)):
            continue
        integ = np.array([simpson_integral(tes[i:i + 3], s[i:i + 3])
                          for i in range(len(tes) - 2)])
        diff = s[:-2] - s[2:]
        h = (tes[2:] - tes[:-2]) / 6
        r2[v] = np.sum(h * diff * diff + integ * diff) / np.sum(integ * integ + h * integ * diff)
        e = np.exp(-r2[v] * tes)
        s0[v] = np.sum(s * e) / np.sum(e * e)
    return r2, s0


def rician_mean(a: np.ndarray, sigma: float) -> np.ndarray:
    """E[|a + n|] for complex Gaussian n of per-channel SD σ (scipy Bessel functions)."""
    from scipy.special import i0e, i1e

    nu = a * a / (2 * sigma * sigma)
    return sigma * np.sqrt(np.pi / 2) * ((1 + nu) * i0e(nu / 2) + nu * i1e(nu / 2))


def r2star_nlls_reference(magnitude: np.ndarray, echo_times, noise_sigma=None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Nonlinear least squares per voxel with scipy.optimize.least_squares (tight
    tolerances), model S0·exp(−R2*·TE) or its Rician mean when σ is given."""
    from scipy.optimize import least_squares

    tes = np.asarray(echo_times, dtype=np.float64)
    mag = magnitude.astype(np.float64)
    n = mag.shape[1]
    r2 = np.full(n, np.nan)
    s0 = np.full(n, np.nan)
    init_r2, init_s0 = r2star_loglinear_reference(magnitude, echo_times, weighted=True)

    def predict(p):
        a = p[0] * np.exp(-p[1] * tes)
        return a if noise_sigma is None else rician_mean(a, noise_sigma)

    for v in range(n):
        if not np.isfinite(init_r2[v]):
            continue
        sol = least_squares(lambda p, y=mag[:, v]: predict(p) - y, [init_s0[v], init_r2[v]],
                            x_scale=[init_s0[v], 10.0], xtol=1e-14, ftol=1e-14, gtol=1e-14,
                            method="lm")
        s0[v], r2[v] = sol.x
    return r2, s0


def r2star_quality_reference(magnitude: np.ndarray, echo_times, r2: np.ndarray,
                             s0: np.ndarray, noise_sigma=None, rician: bool = False
                             ) -> tuple[np.ndarray, np.ndarray]:
    """(CRLB SD of R2*, R²) per voxel with a central-difference Jacobian of the model."""
    tes = np.asarray(echo_times, dtype=np.float64)
    y = magnitude.astype(np.float64)
    n = y.shape[1]
    sd = np.full(n, np.nan)
    r_squared = np.full(n, np.nan)

    def predict(a0, rate):
        a = a0 * np.exp(-rate * tes)
        return rician_mean(a, noise_sigma) if rician else a

    for v in range(n):
        p = np.array([s0[v], r2[v]], dtype=np.float64)
        if not np.all(np.isfinite(p)):
            continue
        mu = predict(*p)
        rss = np.sum((y[:, v] - mu) ** 2)
        r_squared[v] = 1 - rss / np.sum((y[:, v] - y[:, v].mean()) ** 2)
        jac = np.empty((len(tes), 2))
        for j in range(2):
            h = 1e-6 * max(abs(p[j]), 1.0)
            dp = np.zeros(2)
            dp[j] = h
            jac[:, j] = (predict(*(p + dp)) - predict(*(p - dp))) / (2 * h)
        var = noise_sigma ** 2 if noise_sigma is not None else rss / (len(tes) - 2)
        sd[v] = np.sqrt(var * np.linalg.inv(jac.T @ jac)[1, 1])
    return sd, r_squared


def crlb_r2star(s0: float, r2: float, echo_times, sigma: float) -> float:
    """Cramér–Rao SD of R2* [s⁻¹] for S0·exp(−R2*·TE) in Gaussian noise σ."""
    tes = np.asarray(echo_times, dtype=np.float64)
    e = np.exp(-r2 * tes)
    jac = np.stack([e, -s0 * tes * e], axis=1)
    return float(np.sqrt(sigma ** 2 * np.linalg.inv(jac.T @ jac)[1, 1]))


def r2star_arlo_vectorised(magnitude: np.ndarray, echo_times) -> tuple[np.ndarray, np.ndarray]:
    """Float32 vectorised ARLO for evenly spaced echoes (the bench baseline)."""
    tes = np.asarray(echo_times, dtype=np.float32)
    h = np.float32((tes[1] - tes[0]) / 3)
    integ = h * (magnitude[:-2] + 4 * magnitude[1:-1] + magnitude[2:])
    diff = magnitude[:-2] - magnitude[2:]
    r2 = (h * (diff * diff).sum(0) + (integ * diff).sum(0)) / (
        (integ * integ).sum(0) + h * (integ * diff).sum(0))
    e = np.exp(-r2[None] * tes[:, None])
    return r2, (magnitude * e).sum(0) / (e * e).sum(0)

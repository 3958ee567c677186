"""NumPy/SciPy twins of the single-step Laplacian TV solver (``_core.sstv_admm``): its even
dipole kernel and the same ADMM with the same four real FFTs per iteration, for the
agreement test (float64 NumPy) and the benchmark (float32 SciPy, ``bench_inversion``)."""

from __future__ import annotations

import numpy as np

from twins_qsm import NUMPY, FftBackend, gradient_energy


def even_dipole_kernel(shape, voxel_size, b0_dir) -> np.ndarray:
    """D = 1/3 − (k·b̂)²/|k|² on the full fftn grid [unitless], k in cycles/mm, b̂ in
    voxel-index space, averaged over ±½ cycle/voxel on the Nyquist index of each even axis
    (as sstv does, so that D(k) = D(−k)); D(0) = 0."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    axes = []
    for n, h in zip(shape, voxel_size, strict=True):
        f = np.fft.fftfreq(n)
        flipped = f.copy()
        if n % 2 == 0:
            flipped[n // 2] = 0.5
        axes.append((f / h, flipped / h))
    total = np.zeros(shape)
    for choice in np.ndindex(2, 2, 2):
        k = np.meshgrid(*[axes[i][c] for i, c in enumerate(choice)], indexing="ij")
        k2 = sum(x * x for x in k)
        k2[0, 0, 0] = 1.0
        total += 1 / 3 - sum(k[i] * b[i] for i in range(3)) ** 2 / k2
    d = total / 8
    d[0, 0, 0] = 0.0
    return d


def _laplacian(x, vs):
    return sum((np.roll(x, 1, a) + np.roll(x, -1, a) - 2 * x) / vs[a] ** 2 for a in range(3))


def sstv_admm(g, wl, f, wp, voxel_size, b0_dir, alpha, beta, n_iter, mu1=None, mu2=1.0,
              mu3=None, fft: FftBackend = NUMPY) -> np.ndarray:
    """``n_iter`` iterations of the sstv ADMM (no stopping test) → χ [ppm].

    Same splits and update order as the Rust kernel: χ̂ = [F{μ₁∇ᵀa₁} + D·F{μ₂L a₂ + μ₃a₃}]
    / (μ₁Σ|Eₐ|² + D²(μ₂L² + μ₃)), χ and Dχ by two inverse real FFTs, ∇χ and L·Dχ by
    periodic stencils.
    """
    shape, vs = g.shape, voxel_size
    dt = fft.dtype
    mu1 = 10 * alpha if mu1 is None else mu1
    mu3 = beta if mu3 is None else mu3
    d = even_dipole_kernel(shape, vs, b0_dir)[:, :, : shape[2] // 2 + 1]
    e2 = gradient_energy(shape, vs)
    den = mu1 * e2 + d**2 * (mu2 * e2**2 + mu3)
    den[0, 0, 0] = 1.0
    d, q = d.astype(dt), (1.0 / den).astype(dt)
    g, wl, f, wp = (np.asarray(x, dt) for x in (g, wl, f, wp))
    thr = dt(alpha / mu1)
    u1, a1 = np.zeros((3, *shape), dt), np.zeros((3, *shape), dt)
    u2, a2, u3, a3 = (np.zeros(shape, dt) for _ in range(4))
    chi = np.zeros(shape, dt)
    for _ in range(n_iter):
        div = -mu1 * sum((a1[a] - np.roll(a1[a], 1, a)) / vs[a] for a in range(3))
        spec = (fft.f(div) + d * fft.f(mu2 * _laplacian(a2, vs) + mu3 * a3)) * q
        chi = fft.i(spec, shape).astype(dt)
        dchi = fft.i(d * spec, shape).astype(dt)
        v1 = np.stack([(np.roll(chi, -1, a) - chi) / vs[a] for a in range(3)]) + u1
        u1 = np.clip(v1, -thr, thr)
        a1 = v1 - 2 * u1
        v2 = _laplacian(dchi, vs) + u2
        z2 = (wl * g + mu2 * v2) / (wl + mu2)
        u2, a2 = v2 - z2, 2 * z2 - v2
        v3 = dchi + u3
        den3 = beta * wp + mu3
        z3 = np.where(den3 > 0, (beta * wp * f + mu3 * v3) / np.where(den3 > 0, den3, 1), v3)
        u3, a3 = v3 - z3, 2 * z3 - v3
    return chi

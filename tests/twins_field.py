"""Plain NumPy twins (float64, obviously correct) of the multi-echo field kernels:
temporal unwrapping, the linear and complex field fits and Laplacian unwrapping."""

from __future__ import annotations

import numpy as np

TWO_PI = 2.0 * np.pi


def wrap(x: np.ndarray) -> np.ndarray:
    return x - TWO_PI * np.round(x / TWO_PI)


def temporal_unwrap(phase: np.ndarray, tes, reference: np.ndarray, ref: int) -> np.ndarray:
    """Echo k from its unwrapped neighbour j toward the reference: φ_j·TE_k/TE_j."""
    out = phase.astype(np.float64).copy()
    out[ref] = reference
    order = [(k, k - 1) for k in range(ref + 1, len(tes))] + [
        (k, k + 1) for k in range(ref - 1, -1, -1)]
    for k, j in order:
        pred = out[j] * (tes[k] / tes[j])
        out[k] = out[k] + TWO_PI * np.round((pred - out[k]) / TWO_PI)
    return out


def linear_fit(mag: np.ndarray, unwrapped: np.ndarray, tes) -> tuple[np.ndarray, np.ndarray]:
    """Weighted (m²) least squares y = φ0 + ω t per voxel, by the normal equations."""
    t = np.asarray(tes, np.float64)[:, None]
    w = mag.reshape(len(tes), -1).astype(np.float64) ** 2
    y = unwrapped.reshape(len(tes), -1).astype(np.float64)
    a = np.stack([np.stack([w.sum(0), (w * t).sum(0)], -1),
                  np.stack([(w * t).sum(0), (w * t * t).sum(0)], -1)], -2)
    b = np.stack([(w * y).sum(0), (w * t * y).sum(0)], -1)
    sol = np.linalg.solve(a, b[..., None])[..., 0]
    shape = mag.shape[1:]
    return sol[:, 1].reshape(shape), sol[:, 0].reshape(shape)


def complex_fit(mag: np.ndarray, phase: np.ndarray, tes, omega0: np.ndarray,
                phi00: np.ndarray, n_iter: int = 50, fixed_offset: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """argmin Σ m²|e^{iφ} − e^{i(φ0+ωt)}|² by Gauss-Newton iterations (fixed count, no
    stopping rule); ``fixed_offset`` keeps φ0 and fits ω alone."""
    t = np.asarray(tes, np.float64)[:, None]
    w = mag.reshape(len(tes), -1).astype(np.float64) ** 2
    ph = phase.reshape(len(tes), -1).astype(np.float64)
    omega = omega0.ravel().astype(np.float64)
    phi0 = phi00.ravel().astype(np.float64)
    s0, s1, s2 = w.sum(0), (w * t).sum(0), (w * t * t).sum(0)
    det = s0 * s2 - s1 * s1
    for _ in range(n_iter):
        r = np.sin(ph - phi0 - omega * t)
        g0, g1 = (w * r).sum(0), (w * r * t).sum(0)
        if fixed_offset:
            omega = omega + g1 / s2
            continue
        phi0 = phi0 + (s2 * g0 - s1 * g1) / det
        omega = omega + (s0 * g1 - s1 * g0) / det
    return omega.reshape(mag.shape[1:]), wrap(phi0).reshape(mag.shape[1:])


def laplacian_unwrap_raw(phase: np.ndarray, mask: np.ndarray, margin: int = 4) -> np.ndarray:
    """∇⁻²[cos φ ∇² sin φ − sin φ ∇² cos φ] with the periodic 7-point Laplacian on a grid
    padded by ``margin`` (not to fast lengths: the result only differs by harmonic terms
    the snapping removes, so compare snapped results)."""
    pad = [(margin, margin)] * 3
    z = np.pad(np.where(mask, np.exp(1j * phase.astype(np.float64)), 0), pad)

    def lap(x):
        return sum(np.roll(x, s, a) for a in range(3) for s in (1, -1)) - 6 * x

    rhs = z.real * lap(z.imag) - z.imag * lap(z.real)
    k = [np.fft.fftfreq(n) for n in rhs.shape]
    lam = sum(2 * (np.cos(TWO_PI * kk) - 1).reshape([-1 if d == a else 1 for d in range(3)])
              for a, kk in enumerate(k))
    spec = np.fft.fftn(rhs)
    lam[0, 0, 0] = 1.0
    spec = spec / lam
    spec[0, 0, 0] = 0.0
    out = np.real(np.fft.ifftn(spec))
    sl = tuple(slice(margin, margin + n) for n in phase.shape)
    return out[sl]

"""Edge-unbiased smoothing of a phase-offset map by a local-linear Gaussian fit.

The phase offset φ0 of coil-combined GRE data is smooth but not flat: it can change by
π across a head. A plain Gaussian average of it (as in MCPC-3D-S) is biased wherever the
kernel is cut by the mask's edge (by the gradient × the shift of the kernel's centroid,
up to 0.3 rad on qsm-forward's phantom) and where φ0 curves. Fitting a plane under the
Gaussian weight at every voxel (first-order normalised convolution; Knutsson & Westin,
CVPR 1993) has no bias for a linear φ0 at the edge, and one more pass on the residual
("twicing", Tukey 1977; a third pass, "thricing") reduces the bias of a curved φ0
to higher order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["smooth_local_linear"]

# Voxels solved per batch (bounds the (n, 4, 4) float64 systems to ~128 MB).
_BATCH = 1 << 20


def smooth_local_linear(values: np.ndarray, weight: np.ndarray, mask: np.ndarray, *,
                        voxel_size: Sequence[float], sigma_mm: float, passes: int = 2
                        ) -> np.ndarray:
    """Weighted local-linear Gaussian smoothing of ``values`` inside ``mask``.

    At every mask voxel x0 the plane ``a + g·(x − x0)`` minimising
    ``Σ_x G_σ(x − x0)·w(x)·(v(x) − a − g·(x − x0))²`` over the mask is fitted and
    ``a`` returned. Each further pass smooths the residual of the previous ones and adds
    it (twicing). The moments are summed in blocks of ``factor`` voxels and smoothed on
    that coarse grid when σ spans several voxels (the moments are smooth), then read at
    every fine voxel by linear interpolation.

    Parameters
    ----------
    values : ndarray, shape (X, Y, Z)
        Values to smooth (no wraps: e.g. a small phase difference [rad]).
    weight : ndarray, shape (X, Y, Z)
        Non-negative weights (inverse variance, any scale); non-finite counts as 0.
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels that enter the fit and receive a value.
    voxel_size : 3 floats
        Voxel edges [mm].
    sigma_mm : float
        Gaussian σ [mm], > 0.
    passes : int
        1 = local-linear smoothing; 2 = twiced (default); 3 = thriced.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        Smoothed values in the mask, 0 outside and where no weight is within reach.
    """
    if not (sigma_mm > 0) or passes < 1:
        raise ValueError(f"need sigma_mm > 0 and passes >= 1, got {sigma_mm}, {passes}")
    mask = np.asarray(mask, bool)
    w = np.where(mask & np.isfinite(weight) & np.isfinite(values), weight, 0.0)
    w = w.astype(np.float32)
    v = np.where(w > 0, values, 0.0).astype(np.float32)
    fit = _LocalPlane(w, [sigma_mm / float(s) for s in voxel_size])
    upsample = _Upsampler(mask, fit.factor, fit.coarse_shape)
    out = np.zeros(mask.shape, np.float32)
    total = np.zeros(upsample.n, np.float64)
    for _ in range(passes):
        total += upsample(fit.intercept(v - out))
        out[upsample.idx] = total
    return out


class _LocalPlane:
    """The weighted local plane fits of one weight map, for any number of value maps,
    evaluated at the centres of blocks of ``factor`` voxels (the smoothed φ0 varies
    slowly; the plane extrapolates to a block centre just outside the mask).

    The normal matrix of every fit depends only on the weights, so the first row of its
    inverse is computed once; a value map then needs only its moments Σ G·w·v and
    Σ G·w·v·x (4 smoothed volumes) and a dot product per block.
    """

    def __init__(self, w: np.ndarray, sig_vox: list[float]) -> None:
        self.shape = w.shape
        self.w = w
        self.factor = max(1, int(min(sig_vox)))
        self.sigma = [s / self.factor for s in sig_vox]
        self.coarse_shape = tuple(-(-n // self.factor) for n in self.shape)
        self.centre = [n / 2.0 for n in self.shape]
        self.xs = [self._axis_coord(a) for a in range(3)]
        s0 = self._moment(w)
        # Blocks that any weight reaches (the others stay 0).
        self.idx = np.nonzero(s0 > 1e-9 * max(float(s0.max(initial=0.0)), 1e-30))
        self.n = self.idx[0].size
        f = self.factor
        x0 = [(self.idx[a] + 0.5) * f - 0.5 - self.centre[a] for a in range(3)]
        s0 = s0[self.idx]
        s1 = [self._moment(w * x)[self.idx] for x in self.xs]
        mat = np.empty((self.n, 4, 4))
        mat[:, 0, 0] = s0
        for i in range(3):
            # Moments about x0: Σw(x−x0)_i = M1_i − x0_i·M0, and so on.
            mat[:, 0, i + 1] = mat[:, i + 1, 0] = s1[i] - x0[i] * s0
            for j in range(i, 3):
                m2 = self._moment(w * self.xs[i] * self.xs[j])[self.idx]
                mat[:, i + 1, j + 1] = mat[:, j + 1, i + 1] = (
                    m2 - x0[i] * s1[j] - x0[j] * s1[i] + x0[i] * x0[j] * s0)
        # A small ridge on the slope keeps lone voxels (a plane through one point) solvable.
        for i in range(1, 4):
            mat[:, i, i] += 1e-3 * s0
        e0 = np.zeros((self.n, 4, 1))
        e0[:, 0, 0] = 1.0
        # The intercept is row 0 of A⁻¹ times the right-hand side (A is symmetric).
        self.row = np.linalg.solve(mat, e0)[:, :, 0]
        self.x0 = x0

    def _axis_coord(self, axis: int) -> np.ndarray:
        c = np.arange(self.shape[axis], dtype=np.float32) - np.float32(self.centre[axis])
        return c.reshape([-1 if a == axis else 1 for a in range(3)])

    def _moment(self, x: np.ndarray) -> np.ndarray:
        """Block sums of ``x`` (fine grid) Gaussian-smoothed on the coarse grid."""
        from scipy import ndimage

        f = self.factor
        for axis in range(3) if f > 1 else ():
            # Strided slices summed axis by axis: each pass shrinks the array f-fold
            # (several times faster than one 6-D reshape-sum); a short last block is
            # padded with zeros.
            n = x.shape[axis]
            if n % f:
                pad = [(0, 0)] * 3
                pad[axis] = (0, f - n % f)
                x = np.pad(x, pad)
            sl = [slice(None)] * 3
            parts = []
            for k in range(f):
                sl[axis] = slice(k, None, f)
                parts.append(x[tuple(sl)])
            x = sum(parts[1:], parts[0].copy())
        return ndimage.gaussian_filter(x.astype(np.float64), self.sigma, mode="constant",
                                       truncate=3.0)

    def intercept(self, v: np.ndarray) -> np.ndarray:
        """The fitted planes' values at the block centres (coarse grid, 0 where no
        weight reaches) for the value map ``v``."""
        wv = self.w * v
        t0 = self._moment(wv)[self.idx]
        total = self.row[:, 0] * t0
        for i in range(3):
            t1 = self._moment(wv * self.xs[i])[self.idx] - self.x0[i] * t0
            total += self.row[:, i + 1] * t1
        out = np.zeros(self.coarse_shape, np.float64)
        out[self.idx] = total
        return out


class _Upsampler:
    """Trilinear interpolation of a block-centred coarse grid at the mask's voxels."""

    def __init__(self, mask: np.ndarray, factor: int, coarse_shape: tuple[int, ...]
                 ) -> None:
        self.idx = np.nonzero(mask)
        self.n = self.idx[0].size
        flat = np.zeros(self.n, np.intp)
        weight = np.ones(self.n, np.float64)
        corners = [(flat, weight)]
        for axis in range(3):
            pos = (self.idx[axis] + 0.5) / factor - 0.5
            lo = np.clip(np.floor(pos).astype(np.intp), 0, coarse_shape[axis] - 1)
            hi = np.minimum(lo + 1, coarse_shape[axis] - 1)
            t = np.clip(pos - lo, 0.0, 1.0)
            stride = int(np.prod(coarse_shape[axis + 1:]))
            corners = [(fl + lo * stride, wt * (1.0 - t)) for fl, wt in corners] + \
                      [(fl + hi * stride, wt * t) for fl, wt in corners]
        self.index = np.stack([fl for fl, _ in corners])
        self.weight = np.stack([wt for _, wt in corners])

    def __call__(self, coarse: np.ndarray) -> np.ndarray:
        return np.einsum("kn,kn->n", coarse.ravel()[self.index], self.weight)

"""Benchmark: background-field removal by PDF, iSMV and LBV.

Each Rust kernel runs a fixed number of iterations (``tol = 0``) and is timed against a
SciPy implementation of the same iterations (``scipy.fft`` real transforms in float32
with all cores, the same padding and masks) on the same data in the same process.

Full size is 256×256×176 (one field map; the field is combined over echoes before
background removal); ``quick=True`` uses 64×64×48. Run ``python bench/bench_bfr.py
[--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.fft as sfft
from scipy import ndimage
from timing import paired_best, row  # noqa: E402

from alsiron import qsm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import twins_qsm as twins  # noqa: E402

VOXEL = (1.0, 1.0, 1.0)
B0 = (0.0, 0.1, 1.0)
PDF_ITER = 10
ANCHOR_SMOOTHING = 3e-4  # λ [mm²] of the single-step anchor's PDF (settings.PDF_DEFAULTS)
ISMV_ITER = 20
LBV_ITER = 50


def _data(shape):
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    mask = (x / 0.8) ** 2 + (y / 0.75) ** 2 + (z / 0.7) ** 2 < 1
    field = (0.5 * z**2 - 0.3 * x * y + 0.05 * np.sin(20 * x)).astype(np.float32)
    return field, mask


def _pad(x, padded):
    out = np.zeros(padded, np.float32)
    out[: x.shape[0], : x.shape[1], : x.shape[2]] = x
    return out


def _dot(a, b):
    # float64 accumulation, as the Rust kernel (float32 BLAS dots drift over CG steps).
    return float(np.dot(a.ravel().astype(np.float64), b.ravel().astype(np.float64)))


def scipy_pdf(field, mask, n_iter, *, source_smoothing=0.0, sources=None):
    """PDF: ``n_iter`` CG steps on the normal equations, float32 scipy.fft; with
    ``sources`` the background sources are kept there (and in the padding), with
    ``source_smoothing`` λ their squared-gradient penalty."""
    shape = field.shape
    padded = tuple(twins.fast_len(n + qsm.PDF_PAD_VOXELS) for n in shape)
    inside = _pad(mask, padded) > 0.5
    outside = ~inside
    if sources is not None:
        outside &= ~(_pad(~sources, padded) > 0.5)
    d = twins.dipole_kernel(padded, VOXEL, B0).astype(np.float32)
    w2 = inside.astype(np.float32)
    f = _pad(np.where(mask, field, 0), padded)

    def conv(v):
        return sfft.irfftn(d * sfft.rfftn(v, workers=-1), s=padded, workers=-1)

    r = np.where(outside, conv(w2 * f), 0).astype(np.float32)
    x = np.zeros_like(r)
    p = r.copy()
    rs = _dot(r, r)
    for _ in range(n_iter):
        ap = conv(w2 * conv(p))
        if source_smoothing:
            ap = ap + np.float32(source_smoothing) * twins.source_gradient_penalty(
                p, outside, VOXEL)
        ap = np.where(outside, ap, 0).astype(np.float32)
        alpha = rs / _dot(p, ap)
        x += alpha * p
        r -= alpha * ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    local = np.where(inside, f - conv(x), 0)
    return local[: shape[0], : shape[1], : shape[2]]


def scipy_ismv(field, mask, n_iter):
    """iSMV: ``n_iter`` fixed-point steps, float32 scipy.fft."""
    shape = field.shape
    padded = tuple(twins.fast_len(n) for n in shape)
    radius = 2 * max(VOXEL)
    sphere = twins.sphere_indicator(padded, VOXEL, radius)
    s_hat = (sfft.rfftn(sphere, workers=-1).real / sphere.sum()).astype(np.float32)
    inside = _pad(mask, padded) > 0.5
    eroded = sfft.irfftn(sfft.rfftn(inside.astype(np.float32), workers=-1) * s_hat,
                         s=padded, workers=-1) > 1 - 0.5 / sphere.sum()
    f = _pad(np.where(mask, field, 0), padded)
    boundary = np.where(inside & ~eroded, f, 0).astype(np.float32)
    fb = f.copy()
    for _ in range(n_iter):
        fb = np.where(eroded, sfft.irfftn(sfft.rfftn(fb, workers=-1) * s_hat, s=padded,
                                          workers=-1), boundary).astype(np.float32)
    local = np.where(eroded, f - fb, 0)
    return local[: shape[0], : shape[1], : shape[2]]


def scipy_lbv(field, mask, n_iter):
    """LBV: ``n_iter`` CG steps on the 7-point Laplacian, float32 NumPy slicing with a
    ``scipy.ndimage.correlate`` stencil."""
    inside = mask.astype(bool)
    interior = inside & (ndimage.correlate(inside.astype(np.uint8), _CROSS, mode="constant")
                         == 7)
    inv_h2 = [np.float32(1.0 / h**2) for h in VOXEL]
    stencil = np.zeros((3, 3, 3), np.float32)
    stencil[1, 1, 1] = 2 * sum(inv_h2)
    for a in range(3):
        for side in (0, 2):
            idx = [1, 1, 1]
            idx[a] = side
            stencil[tuple(idx)] = -inv_h2[a]

    def apply(v):
        return np.where(interior, ndimage.correlate(v, stencil, mode="constant"), 0)

    f = field.astype(np.float32)
    boundary = np.where(inside & ~interior, f, 0).astype(np.float32)
    rhs = np.where(interior, -ndimage.correlate(boundary, stencil, mode="constant"), 0)
    x = np.where(interior, f, 0).astype(np.float32)
    r = (rhs - apply(x)).astype(np.float32)
    p = r.copy()
    rs = _dot(r, r)
    for _ in range(n_iter):
        ap = apply(p)
        alpha = np.float32(rs / _dot(p, ap))
        x += alpha * p
        r -= alpha * ap
        rs_new = _dot(r, r)
        p = r + np.float32(rs_new / rs) * p
        rs = rs_new
    return np.where(interior, f - x, 0)


_CROSS = ndimage.generate_binary_structure(3, 1).astype(np.uint8)


def run(quick: bool = False) -> list[dict]:
    """Time PDF, iSMV and LBV (Rust vs SciPy, same iterations); rows as in bench/run.py."""
    shape = (64, 64, 48) if quick else (256, 256, 176)
    repeats = 3 if quick else 2
    field, mask = _data(shape)
    # The eroded mask of a single-step anchor inside its brain: 2 voxels of rim.
    brain = ndimage.binary_dilation(mask, iterations=2)
    rows = []

    cases = [
        (f"pdf ({PDF_ITER} CG it)",
         lambda: qsm.pdf(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                         max_iter=PDF_ITER)[0],
         lambda: scipy_pdf(field, mask, PDF_ITER)),
        (f"pdf, sstv anchor: smooth sources outside the brain ({PDF_ITER} CG it)",
         lambda: qsm.pdf(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                         max_iter=PDF_ITER, source_smoothing=ANCHOR_SMOOTHING,
                         source_mask=~brain)[0],
         lambda: scipy_pdf(field, mask, PDF_ITER, source_smoothing=ANCHOR_SMOOTHING,
                           sources=~brain)),
        (f"ismv ({ISMV_ITER} it)",
         lambda: qsm.ismv(field, mask, voxel_size=VOXEL, tol=0.0, max_iter=ISMV_ITER)[0],
         lambda: scipy_ismv(field, mask, ISMV_ITER)),
        (f"lbv ({LBV_ITER} CG it)",
         lambda: qsm.lbv(field, mask, voxel_size=VOXEL, tol=0.0, max_iter=LBV_ITER)[0],
         lambda: scipy_lbv(field, mask, LBV_ITER)),
    ]
    # Sources kept off a rim make PDF's normal equations ill-conditioned: after 5 CG
    # steps both float32 versions leave the float64 iterates (10 steps: Rust 6.7 %, SciPy
    # 4.3 % of the max, 64 x 64 x 48), so that case is checked after 4 steps.
    _check(qsm.pdf(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0, max_iter=4,
                   source_smoothing=ANCHOR_SMOOTHING, source_mask=~brain)[0],
           scipy_pdf(field, mask, 4, source_smoothing=ANCHOR_SMOOTHING, sources=~brain),
           "pdf with sources outside the brain")
    for name, rust_fn, twin_fn in cases:
        if "sources outside the brain" not in name:
            _check(rust_fn(), twin_fn(), name.split()[0])
        # Warm-up and alternating best-of, as the FFT and inversion benches (timing.py).
        rust_s, ref_s, rust_cpu, ref_cpu = paired_best(rust_fn, twin_fn, repeats)
        rows.append(row(name, shape, rust_s, ref_s, cpu_s=(rust_cpu, ref_cpu)))
    return rows


def _check(got, want, name):
    err = float(np.abs(got - want).max() / np.abs(want).max())
    if err > 1e-3:
        raise RuntimeError(f"{name}: Rust and SciPy differ by {err:.2e} (relative max)")


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)

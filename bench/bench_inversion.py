"""Benchmark of the dipole inversions: Rust core vs SciPy (and NumPy) versions of the
same computation.

Full size is one 256 × 256 × 176 volume (the inversion acts on the combined local field).
Rows {"kernel", "shape", "rust_ms", "numpy_ms", "ratio", "throughput"}: ratio =
twin_ms / rust_ms, throughput in M voxels/s of the Rust kernel (per iteration for the
iterative solvers, which run a fixed iteration count with tol = 0 on both sides).
Kernel names ending in "[scipy]" compare against the twin of tests/twins_qsm.py run with
``scipy.fft`` in float32 and ``workers=-1`` (the "SciPy implementation of the same
iterations"); the others against the float64 ``numpy.fft`` twin (closed-form kernels
only: a float64 NumPy iteration at full size takes minutes).

Run: ``python bench/bench_inversion.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from timing import main, paired_best, row  # noqa: E402

from alsiron.qsm import inversion  # noqa: E402

import twins_qsm as tw  # noqa: E402
import twins_sstv  # noqa: E402

FULL_SHAPE = (256, 256, 176)
QUICK_SHAPE = (48, 48, 40)
VOXEL = (1.0, 1.0, 1.2)
B0 = (0.1, -0.15, 1.0)
ITERATIONS = 5
LAM = 2e-2


def run(quick: bool = False, only: str | None = None) -> list[dict]:
    """Rows of this benchmark; ``only``: comma-separated substrings of the kernel names to
    run (all by default)."""
    wanted = None if only is None else [w for w in only.split(",") if w]

    def selected(name: str) -> bool:
        return wanted is None or any(w in name for w in wanted)

    shape = QUICK_SHAPE if quick else FULL_SHAPE
    rng = np.random.default_rng(0)
    g = np.indices(shape, sparse=True)
    mask = sum(((g[a] - (shape[a] - 1) / 2) / (0.42 * shape[a])) ** 2 for a in range(3)) <= 1
    field = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    magnitude = np.where(mask, 1.0 + 0.2 * rng.random(shape), 0.0).astype(np.float32)
    weight = inversion.magnitude_weight(magnitude, mask)
    edges = inversion.edge_weight(magnitude, mask, voxel_size=VOXEL, edge_fraction=0.3)
    sp = tw.FftBackend("scipy")
    reps = 3
    n_it = ITERATIONS
    geo = {"voxel_size": VOXEL, "b0_dir": B0}
    rows = []

    def add(name, rust_fn, twin_fn, per_iteration=1, twin_reps=None):
        # Both sides warmed up once, then alternating best-of (timing.paired_best).
        if not selected(name):
            return
        t_rust, t_twin, c_rust, c_twin = paired_best(rust_fn, twin_fn, reps, twin_reps)
        rows.append(row(name, shape, t_rust, t_twin, n_vox=int(np.prod(shape)) * per_iteration,
                        cpu_s=(c_rust, c_twin)))

    # Closed-form Tikhonov: vs NumPy float64 and vs SciPy float32 (kernel built in each).
    add("tikhonov", lambda: inversion.tikhonov(field, mask, lam=LAM, **geo),
        lambda: tw.tikhonov(field, mask, VOXEL, B0, LAM))
    add("tikhonov [scipy]", lambda: inversion.tikhonov(field, mask, lam=LAM, **geo),
        lambda: tw.tikhonov(field, mask, VOXEL, B0, LAM, fft=sp))

    add(f"ilsqr ({n_it} it) [scipy]",
        lambda: inversion.ilsqr(field, mask, weight=weight, tol=0.0, max_iter=n_it,
                                streaking=False, **geo),
        lambda: tw.lsqr(field, weight, mask, VOXEL, B0, n_it, fft=sp), n_it)
    add(f"ilsqr + streaking ({n_it} + {n_it} it) [scipy]",
        lambda: inversion.ilsqr(field, mask, weight=weight, tol=0.0, max_iter=n_it,
                                streak_tol=0.0, streak_max_iter=n_it, **geo),
        lambda: tw.ilsqr_streaking(field, weight, mask, VOXEL, B0, n_it, n_it, fft=sp),
        2 * n_it)
    add(f"tv_admm weighted ({n_it} it) [scipy]",
        lambda: inversion.tv_admm_weighted(field, mask, weight=weight, alpha=1e-4,
                                           mu_gradient=0.1, max_iter=n_it, tol=0.0, **geo),
        lambda: tw.weighted_tv_admm(field, weight, None, mask, VOXEL, B0, 1e-4, 0.1, 1.0,
                                    n_it, fft=sp), n_it)
    add(f"tv_admm weak-harmonic ({n_it} it) [scipy]",
        lambda: inversion.tv_admm_weighted(field, mask, weight=weight, alpha=1e-4,
                                           mu_gradient=0.1, max_iter=n_it, tol=0.0,
                                           weak_harmonic=(1e3, 1.0), **geo),
        lambda: tw.weighted_tv_admm(field, weight, None, mask, VOXEL, B0, 1e-4, 0.1, 1.0,
                                    n_it, weak_harmonic=(1e3, 1.0), fft=sp), n_it)
    add(f"medi nonlinear ({n_it} it) [scipy]",
        lambda: inversion.tv_admm_weighted(field, mask, weight=weight, tv_weight=edges,
                                           alpha=1e-4, mu_gradient=0.1, max_iter=n_it,
                                           tol=0.0, phase_scale=16.0, **geo),
        lambda: tw.weighted_tv_admm(field, weight, edges, mask, VOXEL, B0, 1e-4, 0.1, 1.0,
                                    n_it, phase_scale=16.0, fft=sp), n_it)
    add(f"rts ({n_it} LSQR + {n_it} TV it) [scipy]",
        lambda: inversion.rts(field, mask, max_iter=n_it, tol=0.0, lsqr_iter=n_it, **geo),
        lambda: tw.rts(field, mask, VOXEL, B0, 0.15, 1e5, 10.0, n_it, lsqr_iter=n_it, fft=sp),
        2 * n_it)
    add(f"ndi ({n_it} it) [scipy]",
        lambda: inversion.ndi(field, mask, weight=weight, phase_scale=16.0, max_iter=n_it,
                              tol=0.0, **geo),
        lambda: tw.ndi(field, weight, mask, VOXEL, B0, 16.0, 1e-3, 2.0, n_it, fft=sp), n_it)
    # Single-step Laplacian TV with an anchor: g and f random, both weights the mask.
    n_sstv = 10
    lap = np.where(mask, 1e-3 * rng.standard_normal(shape), 0).astype(np.float32)
    w_mask = mask.astype(np.float32)
    add(f"sstv_admm ({n_sstv} it) [scipy]",
        lambda: inversion.sstv_admm(lap, w_mask, field, w_mask, alpha=2e-5, beta=1.0,
                                    max_iter=n_sstv, tol=0.0, **geo),
        lambda: twins_sstv.sstv_admm(lap, w_mask, field, w_mask, VOXEL, B0, 2e-5, 1.0,
                                     n_sstv, fft=sp), n_sstv)
    return rows


if __name__ == "__main__":
    main(run)

"""Benchmark of the QSM kernels: Rust core vs the NumPy twins (and scipy.fft float32).

Full size is one 256 × 256 × 176 volume (QSM kernels act on the combined field map, not
per echo). Rows: {"kernel", "shape", "rust_ms", "numpy_ms", "ratio", "throughput"} with
ratio = numpy_ms / rust_ms and throughput in M voxels/s of the Rust kernel. Rows whose
kernel name ends in "[scipy]" compare against ``scipy.fft`` in float32 with
``workers=-1`` instead of the float64 NumPy twin.

Run: ``python bench/bench_qsm.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from timing import best_of, main, paired_best, row  # noqa: E402

from alsiron import _core, qsm  # noqa: E402

import twins_qsm as tw  # noqa: E402

FULL_SHAPE = (256, 256, 176)
QUICK_SHAPE = (48, 48, 40)
VOXEL = (1.0, 1.0, 1.0)
B0 = (0.1, -0.15, 1.0)
ADMM_ITERATIONS = 10


def _scipy_tkd(field, mask, threshold=qsm.TKD_THRESHOLD):
    import scipy.fft as sfft

    d = tw.dipole_kernel(field.shape, VOXEL, B0).astype(np.float32)
    inv = np.where(np.abs(d) > threshold, 1.0 / np.where(d == 0, 1.0, d), np.sign(d) / threshold)
    spec = sfft.rfftn(np.where(mask, field, np.float32(0)), workers=-1)
    chi = sfft.irfftn(spec * inv.astype(np.float32), s=field.shape, workers=-1)
    return np.where(mask, chi, 0)


def run(quick: bool = False, only: str | None = None) -> list[dict]:
    """Rows of this benchmark; ``only``: comma-separated substrings of the kernel names to
    run (all by default)."""
    wanted = None if only is None else [w for w in only.split(",") if w]

    def selected(name: str) -> bool:
        return wanted is None or any(w in name for w in wanted)

    import scipy.fft as sfft

    shape = QUICK_SHAPE if quick else FULL_SHAPE
    rng = np.random.default_rng(0)
    g = np.indices(shape, sparse=True)
    mask = sum(((g[a] - (shape[a] - 1) / 2) / (0.42 * shape[a])) ** 2 for a in range(3)) <= 1
    field = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    mask_u8 = mask.astype(np.uint8)
    reps_fast = 5 if quick else 3
    reps_slow = 3 if quick else 1
    rows = []

    # FFT forward + inverse, TKD: warm-up and alternating best-of-3 on both sides
    # (timing.paired_best; the float64 NumPy twins used to be timed once, cold).
    def paired(name, rust_fn, twin_fn):
        if not selected(name):
            return
        t_rust, t_twin, c_rust, c_twin = paired_best(rust_fn, twin_fn, reps_fast)
        rows.append(row(name, shape, t_rust, t_twin, cpu_s=(c_rust, c_twin)))

    def rust_fft():
        return _core.fft3_inverse(_core.fft3_forward(field), shape[2])

    def scipy_fft():
        return sfft.irfftn(sfft.rfftn(field, workers=-1), s=shape, workers=-1)

    paired("fft3 fwd+inv", rust_fft, lambda: tw.fft3_inverse(tw.fft3_forward(field), shape[2]))
    paired("fft3 fwd+inv [scipy]", rust_fft, scipy_fft)

    def rust_tkd():
        return qsm.tkd(field, mask, voxel_size=VOXEL, b0_dir=B0)

    paired("tkd", rust_tkd, lambda: tw.tkd(field, mask_u8, VOXEL, B0, qsm.TKD_THRESHOLD))
    paired("tkd [scipy]", rust_tkd, lambda: _scipy_tkd(field, mask))

    # V-SHARP with the default radii (12 mm down to 1 mm at 1 mm voxels).
    if not selected("vsharp"):
        return rows
    radii = qsm.vsharp_default_radii(VOXEL)
    if quick:
        radii = [r for r in radii if r <= 6.0]

    def rust_vsharp():
        return qsm.vsharp(field, mask, voxel_size=VOXEL, radii_mm=radii)

    rust_vsharp()
    t_rust = best_of(rust_vsharp, reps_slow)[0]
    t_np = best_of(lambda: tw.vsharp(field, mask_u8, VOXEL, radii, qsm.VSHARP_THRESHOLD), 1)[0]
    rows.append(row(f"vsharp ({len(radii)} radii)", shape, t_rust, t_np))

    # TV-ADMM, fixed iteration count.
    if not selected("tv_admm"):
        return rows
    def rust_admm():
        return qsm.tv_admm(
            field, mask, voxel_size=VOXEL, b0_dir=B0, max_iter=ADMM_ITERATIONS, tol=0.0
        )

    t_rust = best_of(rust_admm, reps_slow)[0]
    t_np = best_of(
        lambda: tw.tv_admm(field, mask_u8, VOXEL, B0, qsm.TV_ALPHA, qsm.TV_MU, ADMM_ITERATIONS), 1
    )[0]
    rows.append(row(f"tv_admm ({ADMM_ITERATIONS} it)", shape, t_rust, t_np))
    return rows


if __name__ == "__main__":
    main(run)

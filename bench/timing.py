"""Timing and result rows shared by the benchmark modules (see bench/run.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time [s] of ``repeats`` calls of ``fn``, and the last call's result."""
    best, out = np.inf, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def row(kernel: str, shape: Sequence[int] | str, rust_s: float, twin_s: float,
        n_vox: int | None = None) -> dict:
    """One result row: times in ms, ratio twin/Rust, Rust throughput in M voxels/s.

    ``shape`` is a volume shape (its voxel count is the default ``n_vox``) or a label.
    """
    if n_vox is None:
        n_vox = int(np.prod(shape))
    label = shape if isinstance(shape, str) else "x".join(str(s) for s in shape)
    return {
        "kernel": kernel,
        "shape": label,
        "rust_ms": round(rust_s * 1e3, 2),
        "numpy_ms": round(twin_s * 1e3, 2),
        "ratio": round(twin_s / rust_s, 2) if rust_s > 0 else float("nan"),
        "throughput": round(n_vox / rust_s / 1e6, 3) if rust_s > 0 else float("nan"),
    }

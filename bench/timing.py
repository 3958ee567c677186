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


def paired_best(rust_fn: Callable[[], Any], twin_fn: Callable[[], Any], repeats: int = 3,
                twin_repeats: int | None = None) -> tuple[float, float, float, float]:
    """Best wall and process-CPU times [s] of a Rust kernel and its twin, measured alike.

    Both sides get one untimed warm-up call (plans, page cache, and the first-touch cost of
    fresh memory: NumPy asks for transparent huge pages on large arrays, and the kernel's
    direct compaction on the first such faults of a process costs the twin 0.3-0.7 s of
    system time at 256x256x176 that later calls do not pay), then the calls alternate so
    that load from other processes hits both alike, and the best of each is kept.
    Returns (rust_wall, twin_wall, rust_cpu, twin_cpu).
    """
    twin_repeats = repeats if twin_repeats is None else twin_repeats
    rust_fn()
    twin_fn()
    best = {"rust": [np.inf, np.inf], "twin": [np.inf, np.inf]}
    for k in range(max(repeats, twin_repeats)):
        for side, fn, n in (("rust", rust_fn, repeats), ("twin", twin_fn, twin_repeats)):
            if k >= n:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[side] = [min(best[side][0], wall), min(best[side][1], cpu)]
    return best["rust"][0], best["twin"][0], best["rust"][1], best["twin"][1]


def row(kernel: str, shape: Sequence[int] | str, rust_s: float, twin_s: float,
        n_vox: int | None = None, cpu_s: tuple[float, float] | None = None) -> dict:
    """One result row: times in ms, ratio twin/Rust, Rust throughput in M voxels/s.

    ``shape`` is a volume shape (its voxel count is the default ``n_vox``) or a label.
    ``cpu_s`` (Rust, twin) process CPU times [s] add "rust_cpu_ms" and "twin_cpu_ms"
    (on a shared machine they tell load from code).
    """
    if n_vox is None:
        n_vox = int(np.prod(shape))
    label = shape if isinstance(shape, str) else "x".join(str(s) for s in shape)
    cpu = {} if cpu_s is None else {"rust_cpu_ms": round(cpu_s[0] * 1e3, 2),
                                    "twin_cpu_ms": round(cpu_s[1] * 1e3, 2)}
    return cpu | {
        "kernel": kernel,
        "shape": label,
        "rust_ms": round(rust_s * 1e3, 2),
        "numpy_ms": round(twin_s * 1e3, 2),
        "ratio": round(twin_s / rust_s, 2) if rust_s > 0 else float("nan"),
        "throughput": round(n_vox / rust_s / 1e6, 3) if rust_s > 0 else float("nan"),
    }


def main(run: Callable[..., list[dict]], argv: list[str] | None = None) -> None:
    """Command line of a module with ``run(quick, only)``: ``[--quick] [--only=a,b]``.

    Prints the rayon thread count, the load average before and after, and one Markdown
    row per kernel with the process CPU times next to the wall times.
    """
    import os
    import sys

    from alsiron import _core

    args = sys.argv[1:] if argv is None else argv
    load = os.getloadavg()
    only = next((a.split("=", 1)[1] for a in args if a.startswith("--only=")), None)
    rows = run(quick="--quick" in args, only=only)
    print(f"rayon threads: {_core.num_threads()}; load average before/after: "
          f"{load[0]:.2f} / {os.getloadavg()[0]:.2f}")
    header = ["kernel", "shape", "rust_ms", "numpy_ms", "ratio", "throughput", "rust_cpu_ms",
              "twin_cpu_ms"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r.get(h, "")) for h in header) + " |")

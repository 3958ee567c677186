"""Benchmark harness: throughput of each Rust kernel and its ratio to a NumPy/SciPy twin.

Usage: ``python bench/run.py [--quick] [--only qsm|fit] [--markdown]``. Every row times
the Rust kernel and its twin in this process on the same data (best of several runs).
Full size is a 256x256x176 volume with 6 echoes; ``--quick`` uses a small volume.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODULES = ("bench_qsm", "bench_inversion", "bench_bfr", "bench_fit", "bench_field",
           "bench_relax", "bench_chain", "bench_registry", "bench_roi", "bench_bet")


def machine() -> str:
    """One line describing the machine the figures come from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from alsiron import _core

    return (f"{cpu}, {os.cpu_count()} logical cores, rayon threads {_core.num_threads()}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small volume (seconds)")
    ap.add_argument("--only", choices=[m.split("_", 1)[1] for m in MODULES])
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    rows = []
    for name in MODULES:
        if args.only and not name.endswith(args.only):
            continue
        rows.extend(importlib.import_module(name).run(quick=args.quick))
    print(f"# machine: {machine()}")
    cols = ["kernel", "shape", "rust_ms", "numpy_ms", "ratio", "throughput"]
    if args.markdown:
        print("| kernel | shape | Rust [ms] | twin [ms] | ratio | M voxels/s |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['kernel']} | {r['shape']} | {r['rust_ms']:.1f} | {r['numpy_ms']:.1f} "
                  f"| {r['ratio']:.1f}x | {r['throughput']:.1f} |")
    else:
        print("  ".join(f"{c:>24}" if i == 0 else f"{c:>14}" for i, c in enumerate(cols)))
        for r in rows:
            print(f"{r['kernel']:>24}  {r['shape']!s:>14}  {r['rust_ms']:>14.1f}  "
                  f"{r['numpy_ms']:>14.1f}  {r['ratio']:>13.1f}x  {r['throughput']:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

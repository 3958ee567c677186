"""Benchmark of the BET-like brain mask: Rust surface evolution vs its NumPy twin, and
the whole ``bet`` mask vs the Otsu + morphology mask (the method it replaces).

Full size is a 256 × 256 × 176 head (the phantom geometry at 1 mm with a spinal canal,
no supersampling); ``quick`` uses the 3 mm head (56 × 66 × 64). Rows:
{"kernel", "shape", "rust_ms", "numpy_ms", "ratio", "throughput"}; for the "brain_mask"
row ``rust_ms`` is the whole ``bet`` call (statistics, evolution, rasterisation) and
``numpy_ms`` is ``bm.brain_mask(method="otsu")``. The NumPy twin of the evolution runs
fewer iterations and is scaled to the same count (its cost per iteration is constant).

Run: ``python bench/bench_bet.py [--quick]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import twins_bet as tw  # noqa: E402
from bet_phantom import head_magnitude  # noqa: E402
from timing import best_of, row  # noqa: E402

from alsiron import _core  # noqa: E402
from alsiron.field import brain_mask as bet
from alsiron.field import brain_mask as bm  # noqa: E402

FULL_SHAPE = (256, 256, 176)
QUICK_SHAPE = (56, 66, 64)


def run(quick: bool = False) -> list[dict]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    vs = (3.0, 3.0, 3.0) if quick else (1.0, 1.0, 1.0)
    head = head_magnitude(shape, vs, supersampling=2 if quick else 1,
                          foramen_radius_mm=15.0, bias_gain=1.6)
    mag, vsz = head.magnitude, np.array(vs)
    stats = bet._head_statistics(mag, vsz)
    unit, faces = bet.icosphere(bet.BET_SUBDIVISIONS)
    start = np.asarray(stats["centre_mm"]) + 0.5 * stats["radius_mm"] * unit
    settings = bet.evolution_settings(stats, bet.BET_FRACTIONAL_INTENSITY, vsz)
    n_it = bet.BET_ITERATIONS
    twin_it = 100
    faces32 = faces.astype(np.uint32)
    rows = []
    fixed = (*settings[:-1], 0.0)  # no early stop: the full iteration count in both
    t_rust, _ = best_of(lambda: _core.bet_evolve_surface(mag, vs, start, faces32, fixed,
                                                         n_it), 3 if quick else 2)
    t_twin, _ = best_of(lambda: tw.evolve(mag, vsz, start, faces, fixed, twin_it), 1)
    rows.append(row(f"bet_evolve ({n_it} it, {len(unit)} vertices)", shape, t_rust,
                    t_twin * n_it / twin_it))
    t_bet, _ = best_of(lambda: bet.bet(mag, vs), 2)
    t_otsu, _ = best_of(lambda: bm.brain_mask(mag, method="otsu"), 2)
    rows.append(row("brain_mask bet [vs otsu+morphology]", shape, t_bet, t_otsu))
    return rows


if __name__ == "__main__":
    import os
    import resource

    quick = "--quick" in sys.argv
    c0 = time.process_time()
    for r in run(quick):
        print(r)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"process CPU {time.process_time() - c0:.1f} s (user {usage.ru_utime:.1f} s), "
          f"load average {os.getloadavg()}")

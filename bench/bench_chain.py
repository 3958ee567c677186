"""Whole default QSM + R2* chain (``workflow.process_series``) on a full-size volume.

A synthetic 256 x 256 x 176, 6-echo, 1 mm head (ellipsoidal brain with deep-grey-like
spheres inside an air surround that makes background fields) is built with the Rust
forward model; the point is time and memory per step, not accuracy (the phantom tests
measure accuracy). There is no NumPy twin of the whole chain: ``numpy_ms`` is NaN.
Peak memory is the process's maximum resident set size after the run.

With ``--transfer`` it also times the second chain run that measures the chain's
transfer of a deep-band change (:mod:`alsiron.qsm.transfer`, the ``gtmrc`` index): the
same chain with a 10 ppb change's field added to the phase and the first run's brain mask.

Run: ``python bench/bench_chain.py [--quick] [--inversion sstv] [--transfer]``.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time

import numpy as np

from alsiron import qsm
from alsiron.constants import GAMMA_BAR_HZ_PER_T
from alsiron.qsm import chain as workflow
from alsiron.qsm.transfer import chain_response
from alsiron.volume import MegreSeries

FULL_SHAPE = (256, 256, 176)
QUICK_SHAPE = (64, 64, 48)
ECHO_TIMES = (0.004, 0.009, 0.014, 0.019, 0.024, 0.029)


def synthetic_series(shape: tuple[int, int, int], seed: int = 0) -> MegreSeries:
    """Six-echo magnitude/phase of an ellipsoidal head at 3 T, 1 mm voxels."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape],
                       indexing="ij")
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, (0.75, 0.85, 0.8), strict=True)))
    brain = r < 1.0
    chi = np.where(brain, np.float32(0.0), np.float32(9.4))  # air outside
    for centre, radius, value in (((0.2, 0.1, 0.0), 0.08, 0.15), ((-0.2, 0.1, 0.0), 0.08, 0.15),
                                  ((0.0, -0.3, 0.2), 0.1, -0.03)):
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        chi[d < radius] = value
    field = qsm.forward_field(chi, voxel_size=(1, 1, 1), b0_dir=(0, 0, 1))
    omega = 2 * math.pi * GAMMA_BAR_HZ_PER_T * 3.0 * 1e-6 * field
    mags, phases = [], []
    for te in ECHO_TIMES:
        sig = np.where(brain, np.exp(-20.0 * te), 0.0) * np.exp(1j * omega * te)
        sig = sig + 0.01 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mags.append(np.abs(sig).astype(np.float32))
        phases.append(np.angle(sig).astype(np.float32))
    return MegreSeries(magnitude=np.stack(mags), phase=np.stack(phases),
                       echo_times=np.asarray(ECHO_TIMES), field_strength=3.0,
                       affine=np.eye(4), voxel_size=(1.0, 1.0, 1.0),
                       b0_direction=(0.0, 0.0, 1.0), subject="bench", session="")


def run(quick: bool = False, inversion: str | None = None,
        transfer: bool = False) -> list[dict]:
    """Per-step and whole-chain rows; ``inversion`` replaces the default inversion (sstv;
    a two-step method gets the two-step PDF settings, as ``alsiron qsm`` gives it);
    ``transfer`` adds the chain-transfer rerun."""
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    series = synthetic_series(shape)
    params = workflow.QsmParameters()
    if inversion is not None:
        params = workflow.QsmParameters(
            background=params.background,
            inversion=dataclasses.replace(params.inversion, method=inversion))
    t0 = time.perf_counter()
    result = workflow.process_series(series, params)
    total = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    n_vox = int(np.prod(shape))
    label = "x".join(map(str, shape)) + "x6e" + (f" [{inversion}]" if inversion else "")
    rows = [{"kernel": f"chain step: {step}", "shape": label, "rust_ms": 1e3 * sec,
             "numpy_ms": float("nan"), "ratio": float("nan"),
             "throughput": n_vox / sec / 1e6} for step, sec in result.timings_s.items()]
    rows.append({"kernel": f"whole chain (peak RSS {peak_gb:.2f} GB)", "shape": label,
                 "rust_ms": 1e3 * total, "numpy_ms": float("nan"), "ratio": float("nan"),
                 "throughput": n_vox / total / 1e6})
    if transfer:
        respond = chain_response(series, workflow.process_series, params=params,
                                 brain_mask=result.brain_mask.data > 0)
        delta = np.zeros(shape, np.float32)
        c = [n // 2 for n in shape]
        delta[c[0] - 8:c[0] + 8, c[1] + 20:c[1] + 24, c[2] - 8:c[2] + 8] = 0.01
        t0 = time.perf_counter()
        respond(delta)
        sec = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        rows.append({"kernel": f"chain transfer rerun (peak RSS {peak_gb:.2f} GB)",
                     "shape": label, "rust_ms": 1e3 * sec, "numpy_ms": float("nan"),
                     "ratio": float("nan"), "throughput": n_vox / sec / 1e6})
    return rows


if __name__ == "__main__":
    chosen = sys.argv[sys.argv.index("--inversion") + 1] if "--inversion" in sys.argv else None
    for row in run(quick="--quick" in sys.argv, inversion=chosen,
                   transfer="--transfer" in sys.argv):
        print(row)

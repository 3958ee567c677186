"""Benchmark: phase unwrapping, multi-echo field fit and log-linear R2* fits.

Rust kernels against NumPy/scikit-image baselines on the same data in the same process:

- ``unwrap_phase``: vs ``skimage.restoration.unwrap_phase`` (3-D, no mask);
- ``fit_multi_echo_field``: vs skimage unwrapping of the echo-pair difference followed by
  the NumPy twin of the temporal unwrapping and weighted fit (tests/twins_fit.py);
- ``fit_r2star_loglinear`` (OLS and S²-weighted): vs a float32 vectorised NumPy fit.

Full size is 256×256×176 with 6 echoes; ``quick=True`` uses 64×64×48.
Run ``python bench/bench_fit.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from skimage.restoration import unwrap_phase as skimage_unwrap
from timing import best_of, row  # noqa: E402

from alsiron import _core

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import twins_fit as twins  # noqa: E402

TES = [0.003, 0.007, 0.011, 0.015, 0.019, 0.023]


def _data(shape, rng):
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / 0.9) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2 < 1
    mag0 = np.where(inside, 1.0 + 0.3 * np.cos(3 * x), 0.05).astype(np.float32)
    field_hz = 120.0 * z**2 - 60.0 * x * y + 30.0 * x  # several wraps per echo
    omega = (2 * np.pi * field_hz).astype(np.float32)
    r2 = np.where(inside, 20.0 + 30.0 * (x * x), 5.0).astype(np.float32)
    tes = np.asarray(TES, np.float32)[:, None, None, None]
    signal = 100.0 * mag0 * np.exp(-r2 * tes) * np.exp(1j * (0.3 + omega * tes))
    signal += rng.standard_normal(signal.shape).astype(np.float32) * (1 + 1j)
    return (np.abs(signal).astype(np.float32), np.angle(signal).astype(np.float32),
            inside.astype(np.uint8))


def _label(shape) -> str:
    return "x".join(map(str, shape)) + f"x{len(TES)}e"


def run(quick: bool = False) -> list[dict]:
    """Time the fit kernels; returns one row per kernel (times in ms, throughput Mvox/s)."""
    shape = (64, 64, 48) if quick else (256, 256, 176)
    repeats = 3 if quick else 2
    rng = np.random.default_rng(0)
    mag, phase, mask = _data(shape, rng)
    n_vox = int(np.prod(shape))
    rows = []

    wrapped = phase[1]
    ones = np.ones(shape, np.uint8)
    rust_s, _ = best_of(lambda: _core.unwrap_phase(wrapped, mag[1], ones), repeats)
    numpy_s, _ = best_of(lambda: skimage_unwrap(wrapped), 1)
    rows.append(row("unwrap_phase (vs skimage)", _label(shape), rust_s, numpy_s, n_vox))

    def numpy_field():
        dphi, pair_mag = twins.pair_difference(mag, phase, TES)
        unwrapped = skimage_unwrap(np.ma.masked_array(dphi, mask == 0)).filled(0.0)
        unwrapped = twins.centre(unwrapped, pair_mag, mask)
        return twins.fit_field_reference(mag, phase, TES, unwrapped, mask)

    rust_s, _ = best_of(lambda: _core.fit_multi_echo_field(mag, phase, TES, mask), repeats)
    numpy_s, _ = best_of(numpy_field, 1)
    rows.append(row("fit_multi_echo_field (vs skimage+numpy)", _label(shape), rust_s, numpy_s,
                    n_vox))

    flat = mag.reshape(len(TES), -1)
    for weighted in (False, True):
        name = "fit_r2star_loglinear" + (" weighted" if weighted else "")
        rust_s, _ = best_of(
            lambda w=weighted: _core.fit_r2star_loglinear(flat, TES, None, w), repeats + 2)
        with np.errstate(all="ignore"):
            numpy_s, _ = best_of(
                lambda w=weighted: twins.r2star_loglinear_vectorised(flat, TES, w), repeats)
        rows.append(row(name + " (vs numpy f32)", _label(shape), rust_s, numpy_s, n_vox))
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)

"""Benchmark: multi-echo field mapping (ROMEO / Laplacian unwrapping, complex fit).

Rows (twin = scikit-image ``unwrap_phase`` on the same 3-D volume, no mask, or for the
whole field estimate: skimage on echo 1 plus the NumPy twins of temporal unwrapping and
the linear and complex fits, tests/twins_field.py):

- ``unwrap_romeo``: one echo, ROMEO weights incl. echo 2's gradient coherence;
- ``unwrap_laplacian``: one echo, FFT Laplacian unwrapping (snapped);
- ``estimate_field romeo+complex``: MCPC-3D-S, unwrapping, temporal unwrapping, linear
  and complex fits and the noise map — the "unwrapping + field fit" of issue 4.

Full size 256×256×176, 6 echoes; ``quick`` uses 64×64×48.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_fit import TES, _data, _label  # noqa: E402
from skimage.restoration import unwrap_phase as skimage_unwrap  # noqa: E402
from timing import best_of, row  # noqa: E402

from alsiron import _core  # noqa: E402
from alsiron.field import echo_fit as fieldmap  # noqa: E402


def run(quick: bool = False) -> list[dict]:
    """Time the field-mapping kernels; one row per kernel (ms, M voxels/s)."""
    shape = (64, 64, 48) if quick else (256, 256, 176)
    repeats = 3 if quick else 2
    mag, phase, mask = _data(shape, np.random.default_rng(0))
    n_vox = int(np.prod(shape))
    ones = np.ones(shape, np.uint8)
    rows = []
    skimage_s, _ = best_of(lambda: skimage_unwrap(phase[1]), 1)
    rust_s, _ = best_of(lambda: _core.unwrap_romeo(phase[1], mag[1], ones, phase[2],
                                                   TES[1] / TES[2]), repeats)
    rows.append(row("unwrap_romeo (vs skimage)", _label(shape), rust_s, skimage_s, n_vox))
    rust_s, _ = best_of(lambda: _core.unwrap_laplacian(phase[1], ones), repeats)
    rows.append(row("unwrap_laplacian (vs skimage)", _label(shape), rust_s, skimage_s, n_vox))

    def twin_chain():
        import twins_field as twins

        first = skimage_unwrap(np.ma.masked_array(phase[0] - 0.3, mask == 0)).filled(0.0)
        unwrapped = twins.temporal_unwrap(phase - 0.3, TES, first, 0)
        omega, phi0 = twins.linear_fit(mag, unwrapped, TES)
        return twins.complex_fit(mag, phase, TES, omega, phi0 + 0.3, n_iter=5)

    rust_s, _ = best_of(lambda: fieldmap.estimate_field(mag, phase, TES, mask,
                                                        field_strength=3.0), repeats)
    twin_s, _ = best_of(twin_chain, 1)
    rows.append(row("estimate_field romeo+complex (vs skimage+numpy)", _label(shape),
                    rust_s, twin_s, n_vox))
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)

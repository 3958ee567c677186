"""Benchmark: total-field error of every field method against the phase offset φ0.

Field NRMSE [%] = ‖(f − mean f) − (t − mean t)‖ / ‖t − mean t‖ over a mask (the means
removed inside that mask: a constant field is invisible to QSM), in the object/brain
mask and in that mask eroded by 2 voxels (the first voxel layer at a brain edge has
intravoxel partial-volume phase errors by physics). Each method is also timed (s, one
call of :func:`alsiron.field.echo_fit.estimate_field`).

Data sources:

- ``qsmforward``: qsm-forward's own simulation (its cylinder phantom, 100³ at 1 mm, 7 T,
  TE 4/12/20/28 ms, peak SNR 100, its 2nd-order shim and its phase offset) with a random
  constant offset U(−π, π) added per seed; ``strong``: also a random smooth φ0
  (the :func:`strong_offset` field) passed to qsm-forward as its ``phase_offset``;
- ``anatomical``: ``simulate_anatomical_subject(voxel_size=2.0, anatomy_seed=(0, 7),
  rng=seed, snr=100)``; ``strong``: the same data with :func:`strong_offset` added to
  the phase of every echo (φ0 is echo-independent, so this is exactly a stronger φ0);
- ``geometric``: ``simulate_subject(rng=seed)`` (96³ at 2 mm, SNR 100), ``strong`` the same.

Run: ``python bench/field_offset.py [--seeds 0 1 2] [--sources qsmforward anatomical
geometric] [--markdown]``. About 3 min on 2 cores for the default three seeds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator

import numpy as np
from scipy import ndimage

from alsiron.field import echo_fit

#: name → estimate_field keyword arguments (``phase_offset``: see
#: :data:`alsiron.field.echo_fit.PHASE_OFFSET_METHODS`).
METHODS: dict[str, dict] = {
    "romeo+complex, φ0 fixed (old default)": dict(unwrapping="romeo", phase_offset="fixed"),
    "romeo linear, φ0 fixed": dict(unwrapping="romeo", complex_fit=False,
                                   phase_offset="fixed"),
    "laplacian+complex, φ0 fixed": dict(unwrapping="laplacian", phase_offset="fixed"),
    "echodiff+complex, φ0 fixed": dict(unwrapping="echodiff", phase_offset="fixed"),
    "romeo+complex, φ0 fitted": dict(unwrapping="romeo", phase_offset="fitted"),
    "romeo linear, φ0 fitted": dict(unwrapping="romeo", complex_fit=False,
                                    phase_offset="fitted"),
    "romeo+complex, φ0 smoothed (new default)": dict(unwrapping="romeo",
                                                     phase_offset="smoothed"),
    "romeo linear, φ0 smoothed": dict(unwrapping="romeo", complex_fit=False,
                                      phase_offset="smoothed"),
    "laplacian+complex, φ0 smoothed": dict(unwrapping="laplacian", phase_offset="smoothed"),
    "echodiff+complex, φ0 smoothed": dict(unwrapping="echodiff", phase_offset="smoothed"),
}


def strong_offset(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random smooth φ0 [rad] over the field of view: constant U(−π, π), linear terms
    N(0, 2.5) and quadratic terms N(0, 1.5) rad in units of the half field of view
    (about 3× the geometric phantom's own φ0 terms)."""
    u, v, w = (np.linspace(-1.0, 1.0, n)[sl] for n, sl in zip(
        shape, ((slice(None), None, None), (None, slice(None), None),
                (None, None, slice(None))), strict=True))
    lin = rng.normal(0.0, 2.5, 3)
    quad = rng.normal(0.0, 1.5, 6)
    return (rng.uniform(-np.pi, np.pi) + lin[0] * u + lin[1] * v + lin[2] * w
            + quad[0] * u * u + quad[1] * v * v + quad[2] * w * w + quad[3] * u * v
            + quad[4] * u * w + quad[5] * v * w).astype(np.float32)


def _wrap(x: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * x)).astype(np.float32)


class Case:
    """One data set: echoes, echo times [s], B0 [T], voxel [mm], mask and true field [ppm]."""

    def __init__(self, mag, phase, tes, b0, voxel, mask, truth):
        self.mag = np.ascontiguousarray(mag, np.float32)
        self.phase = np.ascontiguousarray(phase, np.float32)
        self.tes = tuple(float(t) for t in tes)
        self.b0 = float(b0)
        self.voxel = tuple(float(v) for v in voxel)
        self.mask = np.asarray(mask, bool)
        self.truth = np.asarray(truth, np.float64)


def qsmforward_case(seed: int, strong: bool) -> Case:
    """qsm-forward's cylinders in water (:func:`alsiron.evaluation.qsmforward.simulate_cylinders`),
    its φ0 a random constant, plus :func:`strong_offset` when ``strong``."""
    from alsiron.evaluation.qsmforward import simulate_cylinders

    n = 100
    rng = np.random.default_rng(1000 + seed)
    offset = rng.uniform(-np.pi, np.pi)
    if strong:
        offset = offset + strong_offset((n,) * 3, rng)
    case = simulate_cylinders(seed, "water", size=n, phase_offset=offset)
    s = case.series
    return Case(s.magnitude, s.phase, s.echo_times, s.field_strength, s.voxel_size, case.mask,
                case.field_ppm)


def _session_case(session, seed: int, strong: bool) -> Case:
    phase = session.phase
    if strong:
        extra = strong_offset(session.brain_mask.shape, np.random.default_rng(2000 + seed))
        phase = _wrap(phase + extra[None])
    return Case(session.magnitude, phase, session.echo_times, session.field_strength,
                session.voxel_size, session.brain_mask, session.total_field)


def anatomical_case(seed: int, strong: bool) -> Case:
    """The anatomical head at 2 mm, SNR 100 (``rng=seed``; seed 0 is the brief's rng=11)."""
    from alsiron.sim.anatomical import simulate_anatomical_subject

    s = simulate_anatomical_subject(voxel_size=2.0, anatomy_seed=(0, 7), rng=11 + seed,
                                    snr=100)
    return _session_case(s, seed, strong)


def geometric_case(seed: int, strong: bool) -> Case:
    """The geometric head phantom (defaults: 96³ at 2 mm, SNR 100)."""
    from alsiron.sim.phantom import simulate_subject

    return _session_case(simulate_subject(rng=seed), seed, strong)


SOURCES: dict[str, Callable[[int, bool], Case]] = {
    "qsmforward": qsmforward_case, "anatomical": anatomical_case,
    "geometric": geometric_case}


def field_nrmse(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """NRMSE [%] of ``estimate`` against ``truth`` [ppm] over ``mask``, means removed;
    voxels where the estimate is NaN count with error = −truth (as a 0 field)."""
    est = np.nan_to_num(estimate[mask].astype(np.float64))
    t = truth[mask]
    est -= est.mean()
    t = t - t.mean()
    return float(100.0 * np.linalg.norm(est - t) / np.linalg.norm(t))


def evaluate(case: Case) -> Iterator[tuple[str, float, float, float]]:
    """(method, NRMSE in the mask [%], NRMSE in the mask eroded by 2 voxels [%], s)."""
    eroded = ndimage.binary_erosion(case.mask, iterations=2)
    for name, kwargs in METHODS.items():
        t0 = time.perf_counter()
        fm = echo_fit.estimate_field(case.mag, case.phase, case.tes, case.mask,
                                     field_strength=case.b0, voxel_size=case.voxel,
                                     **kwargs)
        seconds = time.perf_counter() - t0
        yield (name, field_nrmse(fm.field_ppm, case.truth, case.mask),
               field_nrmse(fm.field_ppm, case.truth, eroded), seconds)


def main() -> None:
    """Print one row per (source, offset, seed, method) and the per-source summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--markdown", action="store_true", help="summary as a Markdown table")
    args = ap.parse_args()
    results: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    for source in args.sources:
        for strong in (False, True):
            offset = "strong φ0" if strong else "own φ0"
            for seed in args.seeds:
                case = SOURCES[source](seed, strong)
                for name, full, ero, sec in evaluate(case):
                    print(f"{source:10s} {offset:9s} seed {seed}  {name:42s} "
                          f"{full:6.2f} % {ero:6.2f} % (eroded)  {sec:5.2f} s", flush=True)
                    results.setdefault((source, offset, name), []).append((full, ero, sec))
    _summary(results, args.markdown)


def _summary(results: dict, markdown: bool) -> None:
    print("\nmean over seeds [min-max]: field NRMSE in the mask / eroded 2 voxels, time")
    if markdown:
        print("| source | φ0 | method | NRMSE mask [%] | NRMSE eroded [%] | time [s] |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
    for (source, offset, name), rows in results.items():
        a = np.asarray(rows)
        full = f"{a[:, 0].mean():.2f} [{a[:, 0].min():.2f}-{a[:, 0].max():.2f}]"
        ero = f"{a[:, 1].mean():.2f} [{a[:, 1].min():.2f}-{a[:, 1].max():.2f}]"
        sec = f"{a[:, 2].mean():.2f}"
        if markdown:
            print(f"| {source} | {offset} | {name} | {full} | {ero} | {sec} |")
        else:
            print(f"{source:10s} {offset:9s} {name:42s} {full:18s} {ero:18s} {sec} s")


if __name__ == "__main__":
    main()

"""Report and normative-model timing (pure Python: no Rust kernel, no twin).

Rows follow the common format; the Python time is in ``numpy_ms`` (the pure-Python
column) and ``rust_ms``/``ratio``/``throughput`` are NaN. ``python bench/bench_report.py
[--quick]`` prints them.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import best_of

from alsiron.cohort.normative import build_normative_model
from alsiron.cohort.records import HEADLINE_INDEX
from alsiron.cohort.report import render_cohort_report, render_subject_report, write_report
from alsiron.sim.cohort import simulate_index_cohort

EXTRA_INDICES = ("chi_precentral_mean", "chi_precentral_p90", "chi_precentral_L_mean",
                 "chi_precentral_R_mean", "r2star_precentral_mean")


def _records(n_subjects: int, n_sessions: int, seed: int):
    records, _ = simulate_index_cohort(n_subjects, n_sessions, seed=seed,
                                       als_effect_ppm=0.004)
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        v = r.indices[HEADLINE_INDEX]
        extra = {name: (0.6 + 0.1 * k) * v + rng.normal(0, 0.002)
                 for k, name in enumerate(EXTRA_INDICES)}
        out.append(dataclasses.replace(r, indices={HEADLINE_INDEX: v, **extra}))
    return out


def _montage_png(width_px: int = 1200, height_px: int = 400) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / 100, height_px / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.random.default_rng(0).normal(size=(height_px // 2, width_px // 2)),
              cmap="gray")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _row(kernel: str, shape: str, seconds: float) -> dict:
    nan = float("nan")
    return {"kernel": kernel, "shape": shape, "rust_ms": nan,
            "numpy_ms": round(seconds * 1e3, 2), "ratio": nan, "throughput": nan}


def run(quick: bool = False) -> list[dict]:
    """Time model build, z-scoring, a subject page and a cohort page."""
    n_controls = 300 if quick else 2000
    n_scored = 200 if quick else 1000
    n_cohort = 40 if quick else 200
    repeats = 1 if quick else 3
    rows = []
    train = [r for r in _records(2 * n_controls, 1, seed=1) if r.group == "control"]
    t_cold = time.perf_counter()
    build_normative_model(train[:100])
    t_cold = time.perf_counter() - t_cold
    rows.append(_row("first normative build (imports statsmodels)", "100 controls", t_cold))
    t, model = best_of(lambda: build_normative_model(train), repeats)
    rows.append(_row(f"normative build ({len(model.indices)} indices, "
                     f"{model.harmonisation_label})",
                     f"{len(train)} controls", t))
    scored = _records(n_scored, 1, seed=2)
    t, _ = best_of(lambda: [model.z_scores(r) for r in scored], repeats)
    rows.append(_row("z-scores", f"{n_scored} sessions x {len(model.indices)} indices", t))
    cohort = _records(n_cohort, 4, seed=3)
    subject = [r for r in cohort if r.subject == "sub-02"]
    with tempfile.TemporaryDirectory() as tmp:
        qc = []
        for k in range(2):
            path = Path(tmp) / f"qc{k}.png"
            path.write_bytes(_montage_png())
            qc.append(path)

        def subject_page() -> Path:
            page = render_subject_report(subject, model=model, qc_images=qc)
            return write_report(Path(tmp) / "subject.html", page, overwrite=True)

        t_cold = time.perf_counter()
        subject_page()
        rows.append(_row("first subject report (imports matplotlib)", "4 visits x 4 indices",
                         time.perf_counter() - t_cold))
        t, path = best_of(subject_page, repeats)
        rows.append(_row("subject report (render + write)",
                         f"4 visits x 4 plots + 2 QC, {path.stat().st_size // 1024} KiB", t))

        def cohort_page() -> Path:
            page = render_cohort_report(cohort, model=model)
            return write_report(Path(tmp) / "cohort.html", page, overwrite=True)

        t, path = best_of(cohort_page, repeats)
        rows.append(_row("cohort report (render + write)",
                         f"{n_cohort} subjects x 4 visits, {path.stat().st_size // 1024} KiB", t))
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)

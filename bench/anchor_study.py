"""What the single-step inversion's anchor costs on the anatomical head (issue 13, item 2).

``--inversion sstv`` fits ½‖W_L(Δf − ΔDχ)‖² + β/2‖W_P(f_anchor − Dχ)‖² + α‖∇χ‖₁; the
anchor is a local-field estimate from a background removal. This study keeps everything
else fixed — the chain's own total field, phase-quality mask and anchor mask of each
session, the package's sstv settings — and swaps only the anchor:

- ``LBV`` — what ``alsiron qsm --inversion sstv`` ran before stop 20 (each session its
  own mask);
- ``LBV, shared mask`` — LBV on the intersection of the two sessions' anchor masks. The
  sessions differ only by the ALS excess, yet their phase-quality masks differ in a few
  hundred edge voxels, and LBV's Dirichlet boundary moves with them; this row measures
  the ALS excess without that session-to-session mask noise;
- ``PDF`` (tolerance 1e-4) on the same mask;
- ``PDF, smooth sources`` — PDF whose background sources carry a squared-gradient
  penalty λ‖∇χ_out‖² (``qsm.pdf(..., source_smoothing=λ)``, only between pairs of source
  voxels):
  background tissue (bone, scalp, air) is piecewise smooth, while sources that mimic the
  near-edge cortical field must be rough;
- ``0.4 LBV + 0.6 PDF smooth`` — both anchors in one quadratic term (their weighted mean);
- ``PDF, smooth sources outside the brain`` — the same PDF with its sources kept outside
  the phase-quality mask (``source_mask``), 25 CG iterations: the first anchor of
  ``alsiron qsm --inversion sstv``;
- ``refined`` — what ``alsiron qsm --inversion sstv`` runs: that anchor refined by a
  first pass (``qsm.anchor.refine_anchor``);
- ``true local field`` — the ceiling: the simulator's local field as the anchor.

Scores as ``bench/anatomy_candidates.py`` (``bench/anatomical_phantom.py``). The true
local field is read only by the ceiling row and the scores; nothing here is on the
production path.

Run: ``python bench/anchor_study.py [--voxel-size 2] [--snr 100] [--b0-tilt 0] [--rng 12]
[--smooth-lambda 3e-4] [--pdf-iterations 50]``; prints a JSON row per anchor and a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from anatomy_candidates import (
    add_condition_arguments,
    b0_of,
    pair_scores,
    print_table,
    simulate_pair,
)

from alsiron import qsm
from alsiron.evaluation.stages import series_of
from alsiron.qsm import anchor as single_step_anchor
from alsiron.qsm import inversion as inv
from alsiron.qsm.chain import bfr_input_mask, effective_background, process_series
from alsiron.qsm.settings import PDF_DEFAULTS, BackgroundSettings, QsmParameters


def chain_inputs(sessions: list, params: QsmParameters) -> list[dict[str, Any]]:
    """Each session's total field, phase-quality mask and anchor mask, from the chain."""
    out = []
    for s in sessions:
        series = series_of(s)
        result = process_series(series, params)
        quality = result.qsm_mask.data > 0
        sd = None if result.field_sd is None else result.field_sd.data
        background = effective_background(params, series.voxel_size)
        total = np.nan_to_num(result.total_field.data).astype(np.float64)
        out.append({"total": total,
                    "total_in_quality": np.where(quality, total, 0.0).astype(np.float32),
                    "quality": quality,
                    "anchor_mask": bfr_input_mask(quality, series.voxel_size, background,
                                                  field_sd=sd),
                    "voxel_size": series.voxel_size,
                    "b0": tuple(float(v) for v in series.b0_direction)})
    return out


Anchor = Callable[[int], tuple[np.ndarray, np.ndarray]]


def anchors(inputs: list[dict[str, Any]], sessions: list, smooth_lambda: float,
            pdf_iterations: int) -> dict[str, Anchor]:
    """The anchors compared: name → (session index → (anchor field [ppm], its mask))."""
    shared = inputs[0]["anchor_mask"] & inputs[1]["anchor_mask"]
    cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def lbv_on(k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = inputs[k]
        local, interior, _ = qsm.lbv(c["total_in_quality"], mask, voxel_size=c["voxel_size"])
        return local.astype(np.float64), interior

    def lbv(k: int) -> tuple[np.ndarray, np.ndarray]:
        if ("lbv", k) not in cache:
            cache[("lbv", k)] = lbv_on(k, inputs[k]["anchor_mask"])
        return cache[("lbv", k)]

    def pdf(k: int) -> tuple[np.ndarray, np.ndarray]:
        c = inputs[k]
        local, _ = qsm.pdf(c["total_in_quality"], c["anchor_mask"],
                           voxel_size=c["voxel_size"], b0_dir=c["b0"], tol=1e-4, max_iter=300)
        return local.astype(np.float64), c["anchor_mask"]

    def pdf_smooth(k: int) -> tuple[np.ndarray, np.ndarray]:
        c = inputs[k]
        if ("smooth", k) not in cache:
            local, _ = qsm.pdf(c["total_in_quality"], c["anchor_mask"],
                               voxel_size=c["voxel_size"], b0_dir=c["b0"], tol=1e-4,
                               max_iter=pdf_iterations, source_smoothing=smooth_lambda)
            cache[("smooth", k)] = local.astype(np.float64), c["anchor_mask"]
        return cache[("smooth", k)]

    def mix(k: int) -> tuple[np.ndarray, np.ndarray]:
        a, ma = lbv(k)
        b, mb = pdf_smooth(k)
        return 0.4 * a + 0.6 * b, ma & mb

    def pdf_outside_brain(k: int) -> tuple[np.ndarray, np.ndarray]:
        c = inputs[k]
        if ("outside", k) not in cache:
            single = PDF_DEFAULTS[True]
            local, _ = qsm.pdf(c["total_in_quality"], c["anchor_mask"],
                               voxel_size=c["voxel_size"], b0_dir=c["b0"],
                               tol=single["pdf_tol"], max_iter=single["pdf_max_iter"],
                               source_smoothing=single["pdf_source_smoothing"],
                               source_mask=~c["quality"])
            cache[("outside", k)] = local.astype(np.float64), c["anchor_mask"]
        return cache[("outside", k)]

    def refined(k: int) -> tuple[np.ndarray, np.ndarray]:
        c = inputs[k]
        first, mask = pdf_outside_brain(k)
        local, interior, _ = single_step_anchor.refine_anchor(
            "sstv", c["total"], c["quality"], first, mask, c["anchor_mask"],
            voxel_size=c["voxel_size"], b0_dir=c["b0"],
            settings=inv.InversionSettings(method="sstv"))
        return local.astype(np.float64), interior

    def truth(k: int) -> tuple[np.ndarray, np.ndarray]:
        return sessions[k].local_field.astype(np.float64), inputs[k]["anchor_mask"]

    return {"LBV (the chain's anchor before stop 20)": lbv,
            "LBV, shared mask": lambda k: lbv_on(k, shared),
            "PDF tol 1e-4": pdf,
            f"PDF, smooth sources (lambda {smooth_lambda:g})": pdf_smooth,
            "0.4 LBV + 0.6 PDF smooth": mix,
            "PDF, smooth sources outside the brain (25 it)": pdf_outside_brain,
            "refined (alsiron qsm --inversion sstv)": refined,
            "ceiling: true local field as anchor": truth}


def evaluate(anchor: Anchor, inputs: list[dict[str, Any]], sessions: list,
             settings: inv.InversionSettings, voxel: float) -> dict[str, Any]:
    """Scores of sstv with ``anchor`` on the pair, and its time [s]."""
    t0 = time.perf_counter()
    chis, masks = [], []
    for k, c in enumerate(inputs):
        local, mask = anchor(k)
        chi, _ = inv.invert_single_step(
            "sstv", c["total"], c["quality"], np.where(mask, local, 0.0), mask,
            voxel_size=c["voxel_size"], b0_dir=c["b0"], settings=settings)
        chi = qsm.reference_to_mean(chi, c["quality"])
        chis.append(np.where(c["quality"], chi, np.nan))
        masks.append(c["quality"])
    seconds = time.perf_counter() - t0
    return {**pair_scores(chis, masks, sessions, voxel), "seconds": round(seconds, 1)}


COLUMNS = [("nrmse_pct_brain_less_3mm", "NRMSE %"), ("deep_grey_slope", "slope"),
           ("precentral_minus_local_wm_ratio", "precentral − WM"),
           ("precentral_ribbon_without_chi_pct", "ribbon without χ %"),
           ("als_deep_excess_ratio", "ALS excess")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_condition_arguments(parser, rng=12)
    parser.add_argument("--smooth-lambda", type=float, default=3e-4,
                        help="source-gradient penalty of the smooth-source PDF [mm²]")
    parser.add_argument("--pdf-iterations", type=int, default=50)
    args = parser.parse_args()
    t0 = time.perf_counter()
    sessions = simulate_pair(args.voxel_size, args.snr, b0_of(args.b0_tilt), args.rng)
    # The chain supplies the total field and the masks; sstv_refine_iter 0 skips the
    # refinement it would otherwise run before its own inversion (the anchors are swapped
    # here).
    params = QsmParameters(background=BackgroundSettings(method="lbv"),
                           inversion=inv.InversionSettings(method="sstv", sstv_refine_iter=0))
    inputs = chain_inputs(sessions, params)
    differ = int((inputs[0]["anchor_mask"] ^ inputs[1]["anchor_mask"]).sum())
    setup = {"voxel_mm": args.voxel_size, "snr": args.snr, "b0_tilt_deg": args.b0_tilt,
             "rng": args.rng, "anchor_mask_voxels": int(inputs[0]["anchor_mask"].sum()),
             "anchor_mask_voxels_differing_between_sessions": differ,
             "setup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"row": "setup", **setup}), flush=True)
    table = []
    for name, anchor in anchors(inputs, sessions, args.smooth_lambda,
                                args.pdf_iterations).items():
        row = {"row": "anchor", "name": name, **setup,
               **evaluate(anchor, inputs, sessions, params.inversion, args.voxel_size)}
        print(json.dumps(row), flush=True)
        table.append(row)
    print_table(f"{args.voxel_size} mm, SNR {args.snr:g}, B0 tilt {args.b0_tilt:g}°, "
                f"seed {args.rng}; {differ} anchor-mask voxels differ between the sessions",
                "anchor", table, COLUMNS)


if __name__ == "__main__":
    main()

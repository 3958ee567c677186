"""Which QSM chain keeps the motor cortex on the anatomical head (issue 13, item 2).

One control and one ALS session of the same anatomy (same deformation, phase offset and
noise seed; ``alsiron.sim.anatomical``, built from the MNI152 maps, not from anything
the chain was tuned on) are run through every candidate chain in process (the same
:func:`alsiron.qsm.chain.process_series` that ``alsiron qsm`` runs), and scored with the
issue's measures (see ``bench/anatomical_phantom.py``): χ NRMSE over the brain less
3 mm, deep-grey slope, precentral cortex − local WM contrast recovered / true, the
fraction of the precentral ribbon without a valid χ, and the ALS deep-layer excess
recovered / true. Two ceiling rows invert the TRUE local field inside the TRUE brain
mask, so the loss of each stage can be read off: total field → background removal →
inversion.

Run: ``python bench/anatomy_candidates.py [--voxel-size 2] [--snr 100] [--b0-tilt 0]
[--only NAME ...]``; prints one JSON row per candidate and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from anatomical_phantom import als_excess, scores

from alsiron import qsm
from alsiron.evaluation.stages import series_of, truth_of
from alsiron.qsm import inversion as inv
from alsiron.qsm.chain import process_series
from alsiron.qsm.settings import PDF_DEFAULTS, BackgroundSettings, QsmParameters
from alsiron.sim import anatomical as an


@dataclass(frozen=True)
class Candidate:
    """A chain variant: background-removal and inversion settings that differ from the
    defaults (empty = default), or ``ceiling`` for the true-local-field rows."""

    name: str
    background: dict[str, Any] = field(default_factory=dict)
    inversion: dict[str, Any] = field(default_factory=dict)
    ceiling: bool = False


#: The two-step chain (PDF, 4 mm erosion, tvmasked), named so that rows that change
#: another setting keep it whatever the default is.
TWO_STEP = {"method": "tvmasked"}
#: sstv with the anchor as the background removal gives it (before stop 20).
UNREFINED = {"method": "sstv", "sstv_refine_iter": 0}

CANDIDATES: list[Candidate] = [
    Candidate("default: sstv, refined anchor, noise rule (alsiron qsm)"),
    Candidate("two-step: PDF + tvmasked a=7e-4 (the default until stop 22)",
              inversion=TWO_STEP),
    Candidate("sstv, fixed a=2e-5 (stop 21)",
              inversion={"method": "sstv", "sstv_alpha_rule": "fixed"}),
    Candidate("sstv, stop-20 anchor (first pass at the final a, 20 it)",
              inversion={"method": "sstv", "sstv_refine_iter": 20,
                         "sstv_refine_alpha": None}),
    Candidate("PDF tol 1e-4", {"pdf_tol": 1e-4, "pdf_max_iter": 300}, TWO_STEP),
    Candidate("PDF + tvmasked a=3e-4", inversion={**TWO_STEP, "masked_tv_alpha": 3e-4}),
    Candidate("PDF + tvmasked a=1.5e-4", inversion={**TWO_STEP, "masked_tv_alpha": 1.5e-4}),
    Candidate("PDF + weak-harmonic TV", inversion={"method": "tvadmm",
                                                  "tv_weak_harmonic": True}),
    Candidate("PDF + MEDI", inversion={"method": "medi"}),
    Candidate("LBV + tvmasked", {"method": "lbv"}, TWO_STEP),
    Candidate("LBV + tvmasked a=3e-4", {"method": "lbv"}, {**TWO_STEP, "masked_tv_alpha": 3e-4}),
    Candidate("LBV + tvmasked a=1.5e-4", {"method": "lbv"},
              {**TWO_STEP, "masked_tv_alpha": 1.5e-4}),
    Candidate("LBV 4 mm + tvmasked a=1.5e-4", {"method": "lbv", "erode_mm": 4.0},
              {**TWO_STEP, "masked_tv_alpha": 1.5e-4}),
    Candidate("LBV + MEDI", {"method": "lbv"}, {"method": "medi"}),
    Candidate("LBV + iLSQR", {"method": "lbv"}, {"method": "ilsqr"}),
    Candidate("V-SHARP + tvmasked a=1.5e-4", {"method": "vsharp"},
              {**TWO_STEP, "masked_tv_alpha": 1.5e-4}),
    Candidate("iSMV + tvmasked a=1.5e-4", {"method": "ismv"},
              {**TWO_STEP, "masked_tv_alpha": 1.5e-4}),
    Candidate("sstv (LBV 2 mm anchor, unrefined)", {"method": "lbv"}, UNREFINED),
    Candidate("sstv, LBV 6 mm anchor, unrefined", {"method": "lbv", "erode_mm": 6.0},
              UNREFINED),
    Candidate("sstv, plain PDF 2 mm anchor, unrefined",
              {"method": "pdf", "erode_mm": 2.0, **PDF_DEFAULTS[False]}, UNREFINED),
    Candidate("sstv, LBV anchor refined", {"method": "lbv"}, {"method": "sstv"}),
    Candidate("sstv a=1e-4", inversion={"method": "sstv", "sstv_alpha": 1e-4}),
    Candidate("sstv a=1e-4 b=0.3", inversion={"method": "sstv", "sstv_alpha": 1e-4,
                                               "sstv_beta": 0.3}),
    Candidate("ceiling: true local field, tvmasked a=7e-4", inversion=TWO_STEP, ceiling=True),
    Candidate("ceiling: sstv on the true total field, true local field as anchor",
              inversion=UNREFINED, ceiling=True),
    Candidate("ceiling: true local field, tvmasked a=1.5e-4", inversion={
        **TWO_STEP, "masked_tv_alpha": 1.5e-4}, ceiling=True),
]

#: (JSON key, table header) of the columns of the Markdown table.
COLUMNS = [("nrmse_pct_brain_less_3mm", "NRMSE % (brain − 3 mm)"),
           ("deep_grey_slope", "deep-grey slope"),
           ("precentral_minus_local_wm_ratio", "precentral − WM, rec./true"),
           ("precentral_ribbon_without_chi_pct", "ribbon without χ %"),
           ("als_deep_excess_ratio", "ALS excess rec./true"),
           ("seconds", "s (2 sessions)")]


def simulate_pair(voxel: float, snr: float, b0: tuple[float, float, float],
                  rng: int = 11) -> list:
    """Control and ALS session of one anatomy (seed (0, 7), noise and offset seed rng)."""
    return [an.simulate_anatomical_subject(voxel_size=voxel, anatomy_seed=(0, 7), rng=rng,
                                           snr=snr, group=group, b0_direction=b0)
            for group in ("control", "ALS")]


def chain_runner(c: Candidate) -> Callable[[Any], tuple[np.ndarray, np.ndarray]]:
    """χ [ppm] and its valid mask of one session, for candidate ``c``."""
    settings = inv.InversionSettings(**c.inversion)
    if c.ceiling:
        def run_ceiling(s) -> tuple[np.ndarray, np.ndarray]:
            mask = s.brain_mask.astype(bool)
            if settings.method in inv.SINGLE_STEP_METHODS:
                anchor = qsm.erode_mm(mask, s.voxel_size, 2.0)
                chi, _ = inv.invert_single_step(
                    settings.method, s.total_field, mask, s.local_field, anchor,
                    voxel_size=s.voxel_size,
                    b0_dir=tuple(float(v) for v in s.b0_direction), settings=settings)
                return qsm.reference_to_mean(chi, mask), mask
            chi, _ = inv.invert(settings.method, s.local_field, mask,
                                voxel_size=s.voxel_size,
                                b0_dir=tuple(float(v) for v in s.b0_direction),
                                settings=settings)
            return qsm.reference_to_mean(chi, mask), mask
        return run_ceiling
    params = QsmParameters(background=BackgroundSettings(**c.background), inversion=settings)

    def run_chain(s) -> tuple[np.ndarray, np.ndarray]:
        result = process_series(series_of(s), params)
        return result.chi.data, result.qsm_mask.data > 0
    return run_chain


def evaluate(c: Candidate, sessions: list, voxel: float) -> dict[str, Any]:
    """Scores of candidate ``c`` on the pair (means of the two sessions, ALS excess of
    the pair) and its run time [s]."""
    run = chain_runner(c)
    t0 = time.perf_counter()
    chis, masks = [], []
    for s in sessions:
        chi, mask = run(s)
        chis.append(np.where(mask, chi, np.nan).astype(np.float64))
        masks.append(mask)
    seconds = time.perf_counter() - t0
    return {**pair_scores(chis, masks, sessions, voxel), "seconds": round(seconds, 1)}


def pair_scores(chis: list[np.ndarray], masks: list[np.ndarray], sessions: list,
                voxel: float) -> dict[str, Any]:
    """The issue's scores of a control/ALS pair: each session's scores averaged, and the
    ALS excess of the pair (``chis`` [ppm], NaN where not valid)."""
    truths = [truth_of(s) for s in sessions]
    rows = [scores(chi, mask, t, voxel) for chi, mask, t in zip(chis, masks, truths,
                                                              strict=True)]
    out: dict[str, Any] = {k: round(float(np.mean([r[k] for r in rows])), 3)
                           for k in rows[0]}
    out.update(als_excess(chis, masks, truths))
    return out


def add_condition_arguments(parser: argparse.ArgumentParser, rng: int) -> None:
    """The simulated condition's options: voxel size, SNR, B0 tilt, seed."""
    parser.add_argument("--voxel-size", type=float, default=2.0)
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--b0-tilt", type=float, default=0.0,
                        help="B0 tilted from z towards x [degrees]")
    parser.add_argument("--rng", type=int, default=rng, help="noise and phase-offset seed")


def b0_of(tilt_deg: float) -> tuple[float, float, float]:
    """Unit B0 direction tilted by ``tilt_deg`` degrees from z towards x."""
    tilt = math.radians(tilt_deg)
    return (math.sin(tilt), 0.0, math.cos(tilt))


def print_table(caption: str, first: str, table: list[dict[str, Any]],
                columns: list[tuple[str, str]]) -> None:
    """Print ``table``'s rows as a Markdown table under ``caption``."""
    print(f"\n{caption}\n")
    print(f"| {first} | " + " | ".join(h for _, h in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for row in table:
        print(f"| {row['name']} | " + " | ".join(f"{row[k]:g}" for k, _ in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_condition_arguments(parser, rng=11)
    parser.add_argument("--only", nargs="*", default=None,
                        help="names (or name prefixes) of the candidates to run")
    args = parser.parse_args()
    t0 = time.perf_counter()
    sessions = simulate_pair(args.voxel_size, args.snr, b0_of(args.b0_tilt), args.rng)
    setup = {"voxel_mm": args.voxel_size, "snr": args.snr, "b0_tilt_deg": args.b0_tilt,
             "rng": args.rng,
             "matrix": list(sessions[0].chi.shape),
             "simulation_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"row": "setup", **setup}), flush=True)
    chosen = [c for c in CANDIDATES
              if args.only is None or any(c.name.startswith(o) for o in args.only)]
    table = []
    for c in chosen:
        row = {"row": "candidate", "name": c.name, **setup,
               **evaluate(c, sessions, args.voxel_size)}
        print(json.dumps(row), flush=True)
        table.append(row)
    print_table(f"{args.voxel_size} mm, SNR {args.snr:g}, B0 tilt {args.b0_tilt:g}°, "
                f"seed {args.rng}", "candidate", table, COLUMNS)


if __name__ == "__main__":
    main()

"""χ of the QSM chains on qsm-forward's own simulation (issue 13: a phantom alsiron did not shape).

The phantom and its two surroundings ("water": qsm-forward's example; "air": +9.4 ppm
outside, a head-strength background at the object's edge) are
:func:`alsiron.evaluation.qsmforward.simulate_cylinders`. Every chain runs exactly as
``alsiron qsm`` runs it (:func:`process_series` on the magnitude and phase; its own brain
mask, field fit, background removal, inversion and referencing). Scores
(:func:`alsiron.evaluation.qsmforward.score_cylinders`), on:

- ``common``: the intersection of the object and the QSM masks of all chains compared
  (sstv keeps the whole brain mask, the two-step chain its eroded one);
- ``inner``: ``common`` eroded by one voxel;

χ NRMSE [%], XSIM, and the slope of the mean χ of the five cylinders against their true χ.

Run: ``python bench/qsmforward_chi.py [--seeds 0 1 2] [--surroundings water air]``;
about 5 s per chain and case on 2 cores, plus 10 s per simulation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from alsiron.evaluation import qsmforward as qf
from alsiron.qsm import inversion as inv
from alsiron.qsm.chain import process_series
from alsiron.qsm.settings import QsmParameters

CHAINS: dict[str, QsmParameters] = {
    "default: sstv (refined anchor, noise rule)": QsmParameters(),
    "two-step: pdf + tvmasked (the default until stop 22)": QsmParameters(
        inversion=inv.InversionSettings(method="tvmasked")),
    "sstv, stop-20 anchor (first pass at the final α, 20 it)": QsmParameters(
        inversion=inv.InversionSettings(method="sstv", sstv_refine_iter=20,
                                        sstv_refine_alpha=None)),
    "sstv a=1e-4 b=0.3": QsmParameters(inversion=inv.InversionSettings(
        method="sstv", sstv_alpha=1e-4, sstv_beta=0.3)),
    "pdf + medi": QsmParameters(inversion=inv.InversionSettings(method="medi")),
}


def main() -> None:
    """Print one row per (surrounding, seed, chain) and the mean per chain."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--surroundings", nargs="+", default=["water", "air"],
                    choices=list(qf.SURROUNDINGS))
    args = ap.parse_args()
    table: dict[tuple[str, str], list[dict[str, float]]] = {}
    for surrounding in args.surroundings:
        for seed in args.seeds:
            case = qf.simulate_cylinders(seed, surrounding)
            chis, masks = {}, {}
            for name, params in CHAINS.items():
                t0 = time.perf_counter()
                r = process_series(case.series, params)
                masks[name] = r.qsm_mask.data > 0
                chis[name] = np.nan_to_num(r.chi.data).astype(np.float64)
                print(f"# {surrounding} seed {seed} {name}: {time.perf_counter() - t0:.1f} s, "
                      f"mask {int(masks[name].sum())} of {int(case.mask.sum())} object voxels",
                      flush=True)
            common = case.mask & np.logical_and.reduce(list(masks.values()))
            inner = ndimage.binary_erosion(common)
            for name, chi in chis.items():
                a = qf.score_cylinders(chi, case, common)
                b = qf.score_cylinders(chi, case, inner)
                row = {"common_NRMSE_pct": a["NRMSE_pct"], "inner_NRMSE_pct": b["NRMSE_pct"],
                       "XSIM": a["XSIM"], "CylinderSlope": a["CylinderSlope"]}
                table.setdefault((surrounding, name), []).append(row)
                print(surrounding, seed, name,
                      " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print("\n| surrounding | chain | NRMSE common % | NRMSE one layer in % | XSIM | "
          "cylinder slope |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for (surrounding, name), rows in table.items():
        m = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(f"| {surrounding} | {name} | {m['common_NRMSE_pct']:.1f} | "
              f"{m['inner_NRMSE_pct']:.1f} | {m['XSIM']:.2f} | {m['CylinderSlope']:.2f} |")


if __name__ == "__main__":
    main()

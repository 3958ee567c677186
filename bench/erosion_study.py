"""How deep to erode the QSM mask before background-field removal (docs/qsm_mask_erosion.md).

Usage: ``python bench/erosion_study.py [--cases 64-3mm 96-2mm] [--seeds 3 4]
[--depths 0 2 3 4 6] [--json out.json]``

For each phantom (ALS group, so the deep precentral layer carries the iron excess the
project looks for) the chain's own brain mask, multi-echo field fit and phase-quality
mask are computed ONCE; then every mask setting runs the default background-field
removal (PDF) and inversion (TV-ADMM) exactly as :func:`alsiron.qsm.chain.process_series`
does, and is scored against the phantom truth:

- ``deep_kept`` / ``sup_kept``: fraction of the deep / superficial precentral voxels
  (labels ``precentral_*_deep`` / ``_superficial``) inside the QSM mask;
- ``deep_err_ppb``: mean χ of the deep precentral voxels kept minus its truth, both
  referenced to the whole QSM mask mean (the chain's referencing);
- ``als_ppb`` / ``als_true_ppb``: precentral deep − white matter, estimated and true,
  over the voxels kept (the ALS-like contrast);
- ``slope``: deep-grey regression slope; ``nrmse_own`` / ``xsim_own`` over each
  setting's own mask, ``nrmse_common`` / ``xsim_common`` over one FIXED mask per phantom
  (the intersection of all settings' masks, so that the numbers compare);
- ``rim_nrmse``: χ NRMSE over the voxels a setting keeps beyond the common mask.

Settings: ``e<d>`` = Euclidean erosion by d mm (:func:`alsiron.qsm.bfr.erode_mm`),
``v2`` = the former default (two 6-connected voxel erosions), ``r<k>`` = the
reliability trim (:func:`alsiron.qsm.chain.bfr_input_mask` with
``bfr_trim_sd_factor=k``): no fixed erosion, but voxels within ``bfr_trim_band_mm`` of
the edge whose field SD exceeds k × the median field SD are dropped.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace

import numpy as np

from alsiron import qsm
from alsiron.evaluation import metrics
from alsiron.evaluation.stages import series_of, truth_of
from alsiron.evaluation.truth import score_chi
from alsiron.field import brain_mask as bm
from alsiron.field import echo_fit as fieldmap
from alsiron.qsm.chain import (
    bfr_input_mask,
    default_vsharp_radii,
    inversion_inputs,
    invert,
    remove_background,
)
from alsiron.qsm.inversion import TWO_STEP_DEFAULT, InversionSettings
from alsiron.qsm.settings import BackgroundSettings, QsmParameters
from alsiron.sim.phantom import simulate_subject

#: case → (matrix, voxel size [mm], B0 direction in voxel-index space)
CASES = {"64-3mm": (64, 3.0, (0.0, 0.0, 1.0)), "96-2mm": (96, 2.0, (0.0, 0.0, 1.0)),
         "128-1.5mm": (128, 1.5, (0.0, 0.0, 1.0)),
         "oblique": ((64, 64, 56), (3.0, 3.0, 3.5), (0.0, 0.34, 0.94))}


def settings(depths: list[float], trims: list[float], bfr: str = "pdf"
             ) -> dict[str, QsmParameters]:
    """Setting name → chain parameters (defaults except the pre-BFR mask and ``bfr``), with
    the two-step inversion: the study is of the mask a background removal is given, and the
    default single-step inversion takes no local field."""
    base = QsmParameters(background=BackgroundSettings(method=bfr),
                         inversion=InversionSettings(method=TWO_STEP_DEFAULT))

    def with_background(**changes) -> QsmParameters:
        return replace(base, background=replace(base.background, **changes))

    out = {f"e{d:g}": with_background(erode_mm=d, erode_voxels=None, trim_sd_factor=None)
           for d in depths}
    out["v2"] = with_background(erode_voxels=2, trim_sd_factor=None)
    for k in trims:
        out[f"r{k:g}"] = with_background(erode_mm=0.0, erode_voxels=None, trim_sd_factor=k)
    return out


def run_phantom(matrix, voxel, b0, seed: int, params: dict[str, QsmParameters]
                ) -> list[dict]:
    """Score every setting on one simulated phantom; one row per setting."""
    ses = simulate_subject(matrix=matrix, voxel_size=voxel, b0_direction=b0, group="ALS",
                           rng=seed)
    series = series_of(ses)
    truth = truth_of(ses)
    vsz = series.voxel_size
    p0 = QsmParameters()
    brain = bm.brain_mask(series.magnitude[0], method="otsu",
                          erode_voxels=p0.mask.opening_voxels)
    fm = fieldmap.estimate_field(series.magnitude, series.phase, series.echo_times, brain,
                                 field_strength=series.field_strength,
                                 unwrapping=p0.field.unwrapping, complex_fit=p0.field.complex_fit,
                                 voxel_size=vsz)
    quality = brain & np.isfinite(fm.residual) & (fm.residual <= p0.field.residual_threshold)
    total = np.nan_to_num(fm.field_ppm)
    rss, _ = inversion_inputs(series)
    names = {n: i for i, n in ses.label_names.items()}
    deep_ids = [names[n] for n in names if n.startswith("precentral") and n.endswith("deep")]
    sup_ids = [names[n] for n in names if n.startswith("precentral")
               and n.endswith("superficial")]
    deep_all = np.isin(ses.labels, deep_ids)
    sup_all = np.isin(ses.labels, sup_ids)
    wm_all = ses.labels == names["white_matter"]
    radii = default_vsharp_radii(vsz)

    results = {}
    for name, p in params.items():
        t0, c0 = time.perf_counter(), time.process_time()
        mask = bfr_input_mask(quality, vsz, p.background, field_sd=fm.field_sd_ppm)
        local, qmask, _ = remove_background(total, mask, series, p.background, radii)
        qmask = qmask.astype(bool)
        chi, _ = invert(local, qmask, vsz, series.b0_direction, p.inversion, magnitude=rss)
        chi = qsm.reference_to_mean(chi, qmask).astype(np.float64)
        results[name] = (qmask, chi, time.perf_counter() - t0, time.process_time() - c0)
    common = np.logical_and.reduce([r[0] for r in results.values()]) & truth.brain_mask

    rows = []
    for name, (qmask, chi, wall, cpu) in results.items():
        own = qmask & truth.brain_mask
        s_own = score_chi(chi, own, truth)
        s_com = score_chi(chi, common, truth)
        deep = own & deep_all
        wm = own & wm_all
        tref = ses.chi[own].mean()
        rim = own & ~common
        rows.append({
            "case": case_name(matrix, voxel, b0), "seed": seed,
            "setting": f"{p_bfr(params[name])}:{name}",
            "mask_vox": int(own.sum()), "common_vox": int(common.sum()),
            "deep_kept": float(deep.sum() / deep_all.sum()),
            "sup_kept": float((own & sup_all).sum() / sup_all.sum()),
            "deep_err_ppb": 1e3 * float(chi[deep].mean() - (ses.chi[deep].mean() - tref)),
            "als_ppb": 1e3 * float(chi[deep].mean() - chi[wm].mean()),
            "als_true_ppb": 1e3 * float(ses.chi[deep].mean() - ses.chi[wm].mean()),
            "slope": s_own.get("DeepGreySlope", float("nan")),
            "nrmse_own": s_own["NRMSE_pct"], "xsim_own": s_own["XSIM"],
            "nrmse_common": s_com["NRMSE_pct"], "xsim_common": s_com["XSIM"],
            "rim_nrmse": (metrics.nrmse(chi, ses.chi, rim) if rim.sum() > 10
                          else float("nan")),
            "seconds": wall, "cpu_s": cpu,
        })
    return rows


def case_name(matrix, voxel, b0) -> str:
    """Short label of a phantom geometry."""
    if isinstance(matrix, int):
        return f"{matrix}^3 {voxel:g} mm"
    return "oblique" if b0[2] < 1 else "aniso"


def p_bfr(p: QsmParameters) -> str:
    return p.background.method


FMT = ("{case:>11} {seed:>4} {setting:>12} {mask_vox:>7} {deep_kept:>6.1%} {sup_kept:>6.1%} "
       "{deep_err_ppb:>+7.1f} {als_ppb:>+6.1f} {als_true_ppb:>+6.1f} {slope:>5.2f} "
       "{nrmse_own:>6.1f} {xsim_own:>5.3f} {nrmse_common:>6.1f} {xsim_common:>5.3f} "
       "{rim_nrmse:>6.1f} {seconds:>6.1f}")
HEAD = ("       case seed          set    mask   deep    sup  deepErr    ALS  ALStr slope "
        "NRMSEo XSIMo NRMSEc XSIMc rimNR   wall")


def print_summary(rows: list[dict]) -> None:
    """Mean over seeds per (case, setting), as a Markdown table."""
    keys = ["deep_kept", "sup_kept", "deep_err_ppb", "als_ppb", "als_true_ppb", "slope",
            "nrmse_own", "xsim_own", "nrmse_common", "xsim_common", "rim_nrmse"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["setting"]), []).append(row)
    print("\n| case | setting | seeds | deep kept | sup. kept | deep err ppb | deep−WM ppb "
          "(true) | slope | NRMSE own | XSIM own | NRMSE common | XSIM common | rim NRMSE |")
    print("|" + " --- |" * 13)
    for (case, setting), group in groups.items():
        m = {k: float(np.nanmean([g[k] for g in group])) for k in keys}
        print(f"| {case} | {setting} | {len(group)} | {m['deep_kept']:.1%} | "
              f"{m['sup_kept']:.1%} | {m['deep_err_ppb']:+.1f} | {m['als_ppb']:+.1f} "
              f"({m['als_true_ppb']:+.1f}) | {m['slope']:.2f} | {m['nrmse_own']:.1f} | "
              f"{m['xsim_own']:.3f} | {m['nrmse_common']:.1f} | {m['xsim_common']:.3f} | "
              f"{m['rim_nrmse']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["64-3mm", "96-2mm"], choices=list(CASES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--depths", nargs="+", type=float, default=[0, 2, 3, 4, 6])
    ap.add_argument("--trims", nargs="*", type=float, default=[3.0])
    ap.add_argument("--bfr", default="pdf", help="background-field removal of every setting")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    params = settings(args.depths, args.trims, args.bfr)
    rows = []
    print(HEAD, flush=True)
    for case in args.cases:
        matrix, voxel, b0 = CASES[case]
        for seed in args.seeds:
            for row in run_phantom(matrix, voxel, b0, seed, params):
                rows.append(row)
                print(FMT.format(**row), flush=True)
    print_summary(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

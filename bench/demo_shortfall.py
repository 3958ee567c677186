"""Where a simulated demo loses its ALS effect (issue 13; docs/qsm_anatomy.md, "The
demo's ±20 %").

Reads a finished ``alsiron demo`` output (the phantom's truth in
``derivatives/phantom``, the chain's maps and masks in ``derivatives/alsiron``) and
replaces one link of the headline index at a time with the truth: the truth χ map or the
chain's χ, averaged over the true deep precentral labels or over the tool's own deep
mask (with or without its vein trimming), and the partial-volume-corrected index where the
demo recorded it. Each row is recovered / simulated for the
baseline ALS − control difference and the yearly progression, with the same estimators
as ``alsiron.sim.recovery`` and a 95 % participant-resampling interval. It then splits the
chain's error of the index into a part that repeats at every visit of a participant
(regression of the first-visit value on the simulated one) and one that does not
(residual about each participant's line over visits).

Run: ``python bench/demo_shortfall.py DEMO_DIR`` (e.g. after
``alsiron demo DEMO_DIR --anatomy template``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from alsiron.cohort.records import PARTIAL_VOLUME_INDEX
from alsiron.motor.indices import trimmed_voxels
from alsiron.sim import recovery as rec


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _deep_codes(lookup: Path) -> list[int]:
    rows = [line.split("\t") for line in lookup.read_text().splitlines()[1:] if line]
    return [int(i) for i, name in rows if name.endswith("_deep")]


def session_values(root: Path, s: rec.SimulatedSession) -> dict[str, float]:
    """The index and its variants for one session [ppm]."""
    stem = f"{s.participant_id}/{s.session_id}/anat/{s.participant_id}_{s.session_id}_"
    truth_dir, tool_dir = root / "derivatives" / "phantom", root / "derivatives" / "alsiron"
    truth = _load(truth_dir / (stem + "Chimap.nii.gz")).astype(np.float64)
    labels = _load(truth_dir / (stem + "dseg.nii.gz"))
    chi = _load(tool_dir / (stem + "Chimap.nii.gz")).astype(np.float64)
    valid = (_load(tool_dir / (stem + "desc-qsm_mask.nii.gz")) > 0) & np.isfinite(chi)
    tool = np.isin(_load(tool_dir / (stem + "desc-motorcortex_dseg.nii.gz")),
                   _deep_codes(tool_dir / (stem + "desc-motorcortex_dseg.tsv")))
    true_deep = np.isin(labels, rec.PRECENTRAL_DEEP_LABELS)
    kept = trimmed_voxels(tool, np.where(valid, chi, np.nan), None)

    def mean(x: np.ndarray, m: np.ndarray) -> float:
        return float(x[m & valid].mean()) if (m & valid).any() else math.nan

    gtm = math.nan
    table = tool_dir / (stem + "desc-motorcortex_indices.tsv")
    for line in table.read_text().splitlines()[1:]:
        cells = line.split("\t")
        if cells[0] == PARTIAL_VOLUME_INDEX and cells[4] not in ("n/a", ""):
            gtm = float(cells[4])
    return {"truth map, true deep labels": mean(truth, true_deep),
            "truth map, tool's deep mask": mean(truth, tool),
            "truth map, tool's mask, trimmed": mean(truth, kept),
            "chain, true deep labels": mean(chi, true_deep),
            "chain, tool's mask, trimmed (the index)": mean(chi, kept),
            f"chain, {PARTIAL_VOLUME_INDEX} (as recorded)": gtm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("demo_dir", type=Path)
    root = parser.parse_args().demo_dir
    sims = rec.read_simulated_sessions(root, truth_maps=False)
    rows: dict[str, dict] = {"simulated": {}}
    for s in sims:
        key = (s.participant_id, s.session_id)
        rows["simulated"][key] = (s.group, s.years_since_baseline, s.deep_precentral_ppm)
        for name, value in session_values(root, s).items():
            rows.setdefault(name, {})[key] = (s.group, s.years_since_baseline, value)
    sim = rows["simulated"]
    b0, p0 = rec.baseline_difference(sim), rec.progression_difference(sim)
    print(f"{len(sims)} sessions; simulated baseline {1e3 * b0:+.2f} ppb, "
          f"progression {1e3 * p0:+.2f} ppb/year")
    print("| χ map, averaged over | baseline (95 % interval) | progression (95 % interval) |")
    print("| --- | ---: | ---: |")
    for name, visits in rows.items():
        if name == "simulated" or not any(math.isfinite(v[2]) for v in visits.values()):
            continue
        b = rec.baseline_difference(visits) / b0
        p = rec.progression_difference(visits) / p0
        bi = rec.ratio_interval(sim, visits, effect="baseline")
        pi = rec.ratio_interval(sim, visits, effect="progression")
        print(f"| {name} | {b:.2f} ({bi[0]:.2f}–{bi[1]:.2f}) | "
              f"{p:.2f} ({pi[0]:.2f}–{pi[1]:.2f}) |")
    index = rows["chain, tool's mask, trimmed (the index)"]
    truth = rows["truth map, true deep labels"]
    first = [k for k, v in sim.items() if v[1] == min(w[1] for q, w in sim.items()
                                                      if q[0] == k[0])]
    x = np.array([sim[k][2] for k in first])
    for name, visits in (("truth map", truth), ("index", index)):
        y = np.array([visits[k][2] for k in first])
        slope, icpt = np.polyfit(x, y, 1)
        resid = y - (icpt + slope * x)
        print(f"{name}: first visit on simulated, slope {slope:.2f}, residual SD "
              f"{1e3 * resid.std(ddof=2):.2f} ppb (participant error that does not cancel)")
    by_pid: dict[str, list[tuple[float, float]]] = {}
    for k, (_, years, value) in index.items():
        by_pid.setdefault(k[0], []).append((years, value - truth[k][2]))
    resid, dof = [], 0
    for series in by_pid.values():
        if len({t for t, _ in series}) < 2:
            continue
        t, e = np.array(series).T
        resid += list(e - np.polyval(np.polyfit(t, e, 1), t))
        dof += len(t) - 2
    if dof > 0:
        print(f"index − truth map about each participant's line over visits: SD "
              f"{1e3 * math.sqrt(np.sum(np.square(resid)) / dof):.2f} ppb")


if __name__ == "__main__":
    main()

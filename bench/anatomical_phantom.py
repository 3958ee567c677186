"""How the QSM chain does on the anatomical head phantom (issue 13, item 1): one control
and one ALS session of the same anatomy (same deformation seed, same phase offset and
noise seed), each run through ``alsiron qsm`` with its default settings, scored against
the truth.

Rows (JSON lines): simulation time and peak memory of ``alsiron phantom --anatomy
template`` (a child process, 2 participants x 1 session), and per run: χ NRMSE over the
brain less 3 mm, deep-grey slope, precentral cortex − local WM contrast recovered / true
(local WM: WM within 6 mm of the precentral cortex), ALS deep-layer excess recovered /
true (ALS − control in the true deep band, less the same difference in WM), and the
fraction of the precentral ribbon without a valid χ.  Nothing is tuned here.

Run: ``python bench/anatomical_phantom.py [--voxel-size 2] [--mask truth]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from alsiron.evaluation import metrics
from alsiron.evaluation.truth import load_truth
from alsiron.sim import anatomical as an
from alsiron.sim import phantom as ph
from alsiron.sim.tissues import LABELS, PRECENTRAL_DEEP_LABELS, PRECENTRAL_LABELS

#: The CLI in a child process (the same interpreter and package as this script).
ALSIRON = [sys.executable, "-c", "from alsiron.cli import entry_point; entry_point()"]


def simulate_cli(voxel: float, out: Path) -> dict:
    """Time and peak memory (max RSS of the child) of ``alsiron phantom``."""
    t0 = time.perf_counter()
    subprocess.run([*ALSIRON, "phantom", str(out), "--anatomy",
                    "template", "--voxel-size", str(voxel), "--snr", "100", "--subjects",
                    "2"], check=True, capture_output=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"row": "phantom", "voxel_mm": voxel, "subjects": 2,
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_mb)}


def pair(voxel: float, root: Path) -> None:
    """Control (sub-01) and ALS (sub-02) of one anatomy, written under ``root``."""
    for label, group in (("01", "control"), ("02", "ALS")):
        s = an.simulate_anatomical_subject(voxel_size=voxel, anatomy_seed=(0, 7), rng=11,
                                           snr=100.0, group=group)
        s.parameters.update({"participant_id": f"sub-{label}", "session_id": "ses-01"})
        ph.write_session(root, s, label, "01")


def deep_index(root: Path, label: str) -> float | None:
    """The tool's own headline index ``chi_precentral_deep_mean`` [ppm] of a run."""
    tsv = (root / "derivatives" / "alsiron" / f"sub-{label}" / "ses-01" / "anat" /
           f"sub-{label}_ses-01_desc-motorcortex_indices.tsv")
    if not tsv.is_file():
        return None
    for line in tsv.read_text().splitlines()[1:]:
        cells = line.split("\t")
        if cells[0] == "chi_precentral_deep_mean":
            return float(cells[4])
    return None


def run_qsm(root: Path, label: str, extra: list[str]
            ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Default ``alsiron qsm`` on one subject: χ and QSM mask (None when the run wrote no
    χ) and the command's last lines."""
    proc = subprocess.run([*ALSIRON, "qsm",
                           str(root / f"sub-{label}"), "--no-registry", *extra],
                          capture_output=True, text=True)
    out = root / "derivatives" / "alsiron" / f"sub-{label}" / "ses-01" / "anat"
    stem = f"sub-{label}_ses-01"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    if not (out / f"{stem}_Chimap.nii.gz").is_file():
        return None, None, f"rc={proc.returncode}: " + " | ".join(tail)
    chi = np.asarray(nib.load(str(out / f"{stem}_Chimap.nii.gz")).dataobj, np.float64)
    mask = np.asarray(nib.load(str(out / f"{stem}_desc-qsm_mask.nii.gz")).dataobj) > 0
    return chi, mask, f"rc={proc.returncode}: " + " | ".join(tail)


def scores(chi: np.ndarray, mask: np.ndarray, truth, voxel: float) -> dict:
    """NRMSE (brain less 3 mm), deep-grey slope, precentral − local WM ratio, ribbon loss."""
    valid = mask & np.isfinite(chi)
    inner = ndimage.distance_transform_edt(truth.brain_mask, sampling=voxel) > 3.0
    m = valid & inner
    est = np.where(valid, chi, 0.0)
    ids = truth.deep_grey_ids()
    slope, _ = metrics.region_linearity(est, truth.chi, np.where(valid, truth.labels, 0), ids)
    pre = np.isin(truth.labels, PRECENTRAL_LABELS)
    near = ndimage.distance_transform_edt(~pre, sampling=voxel) <= 6.0
    local_wm = (truth.labels == LABELS["white_matter"]) & near & valid
    sel = pre & valid
    rec = est[sel].mean() - est[local_wm].mean()
    true = truth.chi[sel].mean() - truth.chi[local_wm].mean()
    return {"nrmse_pct_brain_less_3mm": round(metrics.nrmse(est, truth.chi, m), 1),
            "deep_grey_slope": round(slope, 3),
            "precentral_minus_local_wm_ratio": round(float(rec / true), 3),
            "precentral_minus_local_wm_true_ppb": round(1e3 * float(true), 1),
            "precentral_ribbon_without_chi_pct": round(100 * float(1 - valid[pre].mean()), 1)}


def als_excess(chis: list[np.ndarray], masks: list[np.ndarray], truths: list) -> dict:
    """ALS − control in the true deep band less the same difference in WM, recovered / true."""
    deep = np.isin(truths[1].labels, PRECENTRAL_DEEP_LABELS)
    wm = truths[1].labels == LABELS["white_matter"]
    valid = masks[0] & masks[1] & np.isfinite(chis[0]) & np.isfinite(chis[1])
    d = chis[1] - chis[0]
    dt = truths[1].chi - truths[0].chi
    rec = d[deep & valid].mean() - d[wm & valid].mean()
    true = dt[deep & valid].mean() - dt[wm & valid].mean()
    return {"als_deep_excess_true_ppb": round(1e3 * float(true), 2),
            "als_deep_excess_recovered_ppb": round(1e3 * float(rec), 2),
            "als_deep_excess_ratio": round(float(rec / true), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--voxel-size", type=float, default=2.0)
    parser.add_argument("--mask", choices=["default", "truth"], default="default",
                        help="'truth': give alsiron qsm the true brain mask (--mask)")
    parser.add_argument("--skip-cli", action="store_true", help="skip the timing row")
    parser.add_argument("--inversion", default=None,
                        help="alsiron qsm --inversion (default: the chain's default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cli:
            print(json.dumps(simulate_cli(args.voxel_size, Path(tmp) / "cli")), flush=True)
        root = Path(tmp) / "pair"
        pair(args.voxel_size, root)
        chis, masks, truths = [], [], []
        for label in ("01", "02"):
            truth = load_truth(root, {"sub": label, "ses": "01"})
            extra = [] if args.inversion is None else ["--inversion", args.inversion]
            if args.mask == "truth":
                extra = ["--mask", str(root / "derivatives" / "phantom" / f"sub-{label}" /
                                       "ses-01" / "anat" /
                                       f"sub-{label}_ses-01_desc-brain_mask.nii.gz")]
            chi, mask, tail = run_qsm(root, label, extra)
            if chi is None or mask is None:
                print(json.dumps({"row": "qsm", "voxel_mm": args.voxel_size,
                                  "subject": label, "mask": args.mask, "failed": tail[-300:]}),
                      flush=True)
                return
            row = {"row": "qsm", "voxel_mm": args.voxel_size, "subject": label,
                   "mask": args.mask, **scores(chi, mask, truth, args.voxel_size),
                   "qsm_output": tail[-300:]}
            print(json.dumps(row), flush=True)
            chis.append(chi)
            masks.append(mask)
            truths.append(truth)
        print(json.dumps({"row": "als", "voxel_mm": args.voxel_size, "mask": args.mask,
                          "inversion": args.inversion or "default",
                          **als_excess(chis, masks, truths)}), flush=True)
        index = [deep_index(root, label) for label in ("01", "02")]
        deep = np.isin(truths[1].labels, PRECENTRAL_DEEP_LABELS)
        true_diff = float((truths[1].chi - truths[0].chi)[deep].mean())
        if None not in index:
            rec = index[1] - index[0]
            print(json.dumps({"row": "headline index", "index": "chi_precentral_deep_mean",
                              "inversion": args.inversion or "default",
                              "als_minus_control_ppb": round(1e3 * rec, 2),
                              "true_deep_band_excess_ppb": round(1e3 * true_diff, 2),
                              "ratio": round(rec / true_diff, 3)}), flush=True)


if __name__ == "__main__":
    main()

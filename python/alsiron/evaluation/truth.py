"""Accuracy against the ground truth that ``alsiron phantom`` writes beside its data."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from alsiron.evaluation import metrics

#: Substrings of dseg label names counted as deep grey matter for the linearity check.
DEEP_GREY_KEYS = ("caudate", "putamen", "pallidus", "nigra", "red_nucleus", "red nucleus",
                  "thalamus")


@dataclass
class PhantomTruth:
    """Ground-truth maps of one simulated session (arrays on the data grid)."""

    chi: np.ndarray
    r2star: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]

    def deep_grey_ids(self) -> list[int]:
        """Label values of deep grey nuclei."""
        return [i for i, n in self.label_names.items()
                if any(k in n.lower() for k in DEEP_GREY_KEYS)]


def _truth_file(folder: Path, stem: str, tail: str) -> Path:
    return folder / f"{stem}_{tail}.nii.gz"


def _truth_place(dataset_root: Path, entities: dict[str, str]) -> tuple[Path, str]:
    """Folder and file-name stem of a session's phantom truth."""
    folder = Path(dataset_root) / "derivatives" / "phantom" / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    stem = "_".join(f"{k}-{v}" for k, v in entities.items() if k in ("sub", "ses"))
    return folder / "anat", stem


def has_truth(dataset_root: Path, entities: dict[str, str]) -> bool:
    """Whether the session has the ground truth that ``alsiron phantom`` writes beside
    its data (real data never has)."""
    folder, stem = _truth_place(dataset_root, entities)
    return _truth_file(folder, stem, "Chimap").is_file()


def load_truth(dataset_root: Path, entities: dict[str, str]) -> PhantomTruth | None:
    """Load the phantom truth for a session, or None when the dataset has none."""
    if not has_truth(dataset_root, entities):
        return None
    folder, stem = _truth_place(dataset_root, entities)

    def load(tail: str) -> np.ndarray:
        return np.asarray(nib.load(str(_truth_file(folder, stem, tail))).dataobj)

    names: dict[int, str] = {}
    tsv = folder / f"{stem}_dseg.tsv"
    if tsv.is_file():
        with tsv.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                names[int(row["index"])] = row["name"]
    return PhantomTruth(chi=load("Chimap").astype(np.float64),
                        r2star=load("R2starmap").astype(np.float64),
                        brain_mask=load("desc-brain_mask").astype(bool),
                        labels=load("dseg").astype(np.int32), label_names=names)


def score_chi(chi: np.ndarray, mask: np.ndarray, truth: PhantomTruth) -> dict[str, float]:
    """NRMSE, HFEN, XSIM [DESIGN §5] in ``mask`` ∩ truth brain, and deep-grey slope/R²."""
    m = mask.astype(bool) & truth.brain_mask & np.isfinite(chi)
    est = np.where(m, chi, 0.0)
    scores = {
        "NRMSE_pct": metrics.nrmse(est, truth.chi, m),
        "HFEN_pct": metrics.hfen(est, truth.chi, m),
        "XSIM": metrics.xsim(est - est[m].mean(), truth.chi - truth.chi[m].mean(), m),
    }
    contrast = cortical_contrast(chi, m, truth)
    if contrast is not None:
        scores.update(contrast)
    ids = truth.deep_grey_ids()
    if len(ids) >= 2:
        labels = np.where(m, truth.labels, 0)
        slope, r2 = metrics.region_linearity(est, truth.chi, labels, ids)
        scores["DeepGreySlope"] = slope
        scores["DeepGreyR2"] = r2
    return scores


def cortical_contrast(chi: np.ndarray, mask: np.ndarray, truth: PhantomTruth
                      ) -> dict[str, float] | None:
    """Mean χ of cortical GM and of precentral cortex minus mean χ of WM, in ``mask`` [ppm],
    with the same differences of the truth (``..._true``); None without those labels."""
    ids = {name: i for i, name in truth.label_names.items()}
    if "cortical_gm" not in ids or "white_matter" not in ids:
        return None
    wm = mask & (truth.labels == ids["white_matter"])
    groups = {"CortexMinusWM": [ids["cortical_gm"]],
              "PrecentralMinusWM": [i for n, i in ids.items() if n.startswith("precentral")]}
    out: dict[str, float] = {}
    for key, labels in groups.items():
        sel = mask & np.isin(truth.labels, labels)
        if labels and sel.sum() >= 10 and wm.sum() >= 10:
            out[key] = float(chi[sel].mean() - chi[wm].mean())
            out[key + "_true"] = float(truth.chi[sel].mean() - truth.chi[wm].mean())
    return out


def score_r2star(r2star: np.ndarray, mask: np.ndarray, truth: PhantomTruth) -> float:
    """Median absolute relative R2* error [%] in tissue (truth R2* 5-100 1/s) inside mask."""
    m = (mask.astype(bool) & truth.brain_mask & np.isfinite(r2star)
         & (truth.r2star > 5) & (truth.r2star < 100))
    rel = np.abs(r2star[m] - truth.r2star[m]) / truth.r2star[m]
    return float(100 * np.median(rel))


def compare_with_truth(result, dataset_root: Path, entities: dict[str, str]
                       ) -> dict[str, str] | None:
    """Formatted accuracy of a :class:`~alsiron.qsm.chain.SessionResult` vs phantom truth."""
    truth = load_truth(dataset_root, entities)
    if truth is None or truth.chi.shape != result.chi.data.shape:
        return None
    if not (result.qsm_mask.data.astype(bool) & truth.brain_mask).any():
        # A brain mask that missed the brain (e.g. BET following the neck) leaves nothing
        # to score; the run's maps are still written, so say so instead of failing.
        logging.getLogger("alsiron").warning(
            "phantom truth: the QSM mask does not overlap the true brain; nothing scored")
        return {"scored": "nothing (QSM mask outside the true brain)"}
    s = score_chi(result.chi.data, result.qsm_mask.data, truth)
    out = {"chi NRMSE": f"{s['NRMSE_pct']:.1f} %", "HFEN": f"{s['HFEN_pct']:.1f} %",
           "XSIM": f"{s['XSIM']:.3f}"}
    if "DeepGreySlope" in s:
        out["deep-grey slope"] = f"{s['DeepGreySlope']:.2f}"
    for key, text in (("CortexMinusWM", "cortex-WM"), ("PrecentralMinusWM", "precentral-WM")):
        if key in s:
            out[text] = f"{1e3 * s[key]:+.1f} ppb (true {1e3 * s[key + '_true']:+.1f})"
    out["R2* median |error|"] = (
        f"{score_r2star(result.r2star.data, result.brain_mask.data, truth):.1f} %")
    return out

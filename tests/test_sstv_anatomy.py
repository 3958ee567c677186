"""The single-step inversion "sstv" through the QSM chain on the anatomical head phantom
(3 mm, SNR 100, one control and one ALS session of the same anatomy): the motor-cortex
measures of issue 13 against the truth, beside the two-step PDF + tvmasked chain on the
same data.

Measured when written (anatomy seed (0, 1), noise seed 0), as precentral − local WM
contrast / ribbon without χ / deep-grey slope / ALS deep-layer excess / χ NRMSE:

- sstv with its refined anchor (``alsiron qsm --inversion sstv``): 0.78 / 1.5 % / 0.95 /
  0.80 / 73.0 % (0.73 / 1.5 % / 0.91 / 0.74 / 75.3 % with the stop-20 first pass, at the
  final pass's α);
- sstv with LBV's anchor: 0.79 / 1.5 % / 0.99 / 0.75 / 83.8 %;
- PDF + tvmasked: 0.40 / 15.6 % / 0.85 / 0.48 / 71.1 %.

3 mm voxels are coarse for a 2 mm anchor erosion and a thin deep layer (a perfect map on
this grid recovers the excess fully; sstv reaches 0.80–0.81 at 2 mm and its NRMSE
beats the two-step chain's there, docs/qsm_anatomy.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from alsiron.evaluation import metrics
from alsiron.evaluation.stages import series_of, truth_of
from alsiron.qsm.chain import QsmParameters, process_series
from alsiron.qsm.inversion import InversionSettings
from alsiron.qsm.settings import BackgroundSettings
from alsiron.sim import anatomical as an
from alsiron.sim.tissues import LABELS, PRECENTRAL_DEEP_LABELS, PRECENTRAL_LABELS

VOXEL = 3.0
SSTV = QsmParameters(inversion=InversionSettings(method="sstv"))  # its refined anchor
SSTV_LBV = QsmParameters(background=BackgroundSettings(method="lbv"),
                         inversion=InversionSettings(method="sstv", sstv_refine_iter=0))
TWO_STEP = QsmParameters(background=BackgroundSettings(method="pdf"),
                         inversion=InversionSettings(method="tvmasked"))


@pytest.fixture(scope="module")
def sessions() -> list:
    return [an.simulate_anatomical_subject(voxel_size=VOXEL, anatomy_seed=(0, 1), rng=0,
                                           snr=100.0, group=group)
            for group in ("control", "ALS")]


def _run(sessions: list, params: QsmParameters) -> tuple[list, list]:
    chis, masks = [], []
    for s in sessions:
        r = process_series(series_of(s), params)
        mask = r.qsm_mask.data > 0
        chis.append(np.where(mask, r.chi.data, 0.0).astype(np.float64))
        masks.append(mask)
    return chis, masks


def _contrast_and_ribbon(chi: np.ndarray, mask: np.ndarray, truth) -> tuple[float, float]:
    """Precentral cortex − WM within 6 mm of it, recovered / true; ribbon without χ."""
    pre = np.isin(truth.labels, PRECENTRAL_LABELS)
    near = ndimage.distance_transform_edt(~pre, sampling=VOXEL) <= 6.0
    wm = (truth.labels == LABELS["white_matter"]) & near & mask
    sel = pre & mask
    ratio = ((chi[sel].mean() - chi[wm].mean())
             / (truth.chi[sel].mean() - truth.chi[wm].mean()))
    return float(ratio), float(1.0 - mask[pre].mean())


def _als_excess(chis: list, masks: list, truths: list) -> float:
    """ALS − control in the true deep band less the same in WM, recovered / true."""
    deep = np.isin(truths[1].labels, PRECENTRAL_DEEP_LABELS)
    wm = truths[1].labels == LABELS["white_matter"]
    valid = masks[0] & masks[1]
    d, dt = chis[1] - chis[0], truths[1].chi - truths[0].chi
    return float((d[deep & valid].mean() - d[wm & valid].mean())
                 / (dt[deep & valid].mean() - dt[wm & valid].mean()))


@pytest.fixture(scope="module")
def scored(sessions) -> dict:
    truths = [truth_of(s) for s in sessions]
    out = {}
    for name, params in (("sstv", SSTV), ("sstv_lbv", SSTV_LBV), ("two_step", TWO_STEP)):
        chis, masks = _run(sessions, params)
        contrast, ribbon = _contrast_and_ribbon(chis[0], masks[0], truths[0])
        ids = truths[0].deep_grey_ids()
        slope, _ = metrics.region_linearity(chis[0], truths[0].chi,
                                            np.where(masks[0], truths[0].labels, 0), ids)
        inner = ndimage.distance_transform_edt(truths[0].brain_mask, sampling=VOXEL) > 3.0
        out[name] = {"contrast": contrast, "ribbon": ribbon, "slope": slope,
                     "als": _als_excess(chis, masks, truths),
                     "nrmse": metrics.nrmse(chis[0], truths[0].chi, masks[0] & inner)}
    return out


@pytest.mark.parametrize("name", ["sstv", "sstv_lbv"])
def test_sstv_keeps_the_precentral_ribbon_and_its_contrast(scored, name) -> None:
    s = scored[name]
    # Issue 13's targets: ≤ 2 % of the ribbon without χ, contrast ≥ 0.7 of the truth.
    assert s["ribbon"] <= 0.02
    assert s["contrast"] >= 0.7
    # The two-step chain erodes the ribbon and halves the contrast on the same data.
    assert scored["two_step"]["ribbon"] > 5 * s["ribbon"]
    assert s["contrast"] > scored["two_step"]["contrast"] + 0.2


@pytest.mark.parametrize("name", ["sstv", "sstv_lbv"])
def test_sstv_deep_grey_slope_and_als_excess(scored, name) -> None:
    s = scored[name]
    assert 0.9 <= s["slope"] <= 1.1
    # 0.80 (refined) and 0.75 (LBV) measured at 3 mm (a perfect map on this grid: 1);
    # the two-step chain 0.48.
    assert s["als"] >= {"sstv": 0.75, "sstv_lbv": 0.65}[name]
    assert s["als"] > scored["two_step"]["als"] + 0.15


def test_refined_anchor_lowers_the_error_of_lbvs(scored) -> None:
    # The refined anchor's purpose: LBV's anchor carries harmonic errors over the brain
    # (83.8 % NRMSE here); the refined one 73.0 %. Bounded also against a diverging solve.
    assert scored["sstv"]["nrmse"] < scored["sstv_lbv"]["nrmse"] - 5.0
    assert scored["sstv_lbv"]["nrmse"] < 95.0


def test_sstv_provenance_names_its_inputs(sessions) -> None:
    r = process_series(series_of(sessions[0]), SSTV_LBV)
    steps = r.provenance["Steps"]
    inversion = steps["DipoleInversion"]
    assert inversion["Method"].startswith("single-step TV")
    assert inversion["Parameters"]["sstv_alpha"] == pytest.approx(2e-5)
    assert 0 < inversion["LaplacianDataVoxels"] < r.provenance["BrainMaskVoxels"]
    # The anchor's background removal erodes only the outer layer (one voxel edge here).
    assert steps["BackgroundFieldRemoval"]["MaskErosionMm"] == pytest.approx(VOXEL)
    # χ covers the whole phase-quality brain mask; the local field only LBV's mask.
    assert np.isfinite(r.chi.data).sum() == r.provenance["QsmMaskVoxels"]
    assert np.isfinite(r.local_field.data).sum() == r.provenance["LocalFieldMaskVoxels"]
    assert r.provenance["LocalFieldMaskVoxels"] < r.provenance["QsmMaskVoxels"]


def test_refined_anchor_provenance(sessions) -> None:
    r = process_series(series_of(sessions[0]), SSTV)
    bfr = r.provenance["Steps"]["BackgroundFieldRemoval"]
    assert bfr["Method"] == "PDF" and bfr["SourceSmoothing_mm2"] == pytest.approx(3e-4)
    assert "outside the phase-quality brain mask" in bfr["SourceRegion"]
    refined = bfr["AnchorRefinement"]
    assert refined["FirstPassIterations"] == 80 and refined["LBVIterationsRun"] > 0
    assert refined["FirstPassAlpha"] == pytest.approx(7e-4)
    assert refined["AnchorVoxels"] == r.provenance["LocalFieldMaskVoxels"]
    params = r.provenance["Steps"]["DipoleInversion"]["Parameters"]
    assert params["sstv_refine_iter"] == 80 and params["sstv_refine_alpha"] == 7e-4
    assert np.isfinite(r.local_field.data).sum() == r.provenance["LocalFieldMaskVoxels"]


def test_sstv_is_refused_by_the_local_field_inversion() -> None:
    from alsiron.qsm import inversion as inv

    with pytest.raises(ValueError, match="single-step"):
        inv.invert("sstv", np.zeros((8, 8, 8), np.float32), np.ones((8, 8, 8), bool),
                   voxel_size=(1, 1, 1), b0_dir=(0, 0, 1))

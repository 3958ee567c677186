"""The QSM chains on qsm-forward's own simulation: data alsiron was not shaped on.

qsm-forward's cylinders (:mod:`alsiron.evaluation.qsmforward`: 100³ at 1 mm, 7 T, four
echoes, peak SNR 100, its shim and phase offset) in air (+9.4 ppm outside the object, no
signal there: a head-strength background field at the object's edge), run through the
chain exactly as ``alsiron qsm`` runs it. Scores on the intersection of the object and
both chains' QSM masks.

Measured when written (seed 0; NRMSE % / XSIM / cylinder slope):

- two-step (PDF + tvmasked, the default before sstv): 15.3 / 0.64 / 0.95;
- default, sstv (refined anchor, first pass at α 7e-4; its noise rule leaves α at 2e-5
  here): 13.1 / 0.39 / 0.96;
- sstv with the stop-20 anchor (first pass at the final α 2e-5, 20 iterations):
  31.9 / 0.17 / 0.88. The refinement keeps the first pass's error in the anchor; this is
  the data set that showed it (docs/qsm_anatomy.md, "The first pass").
"""

from __future__ import annotations

import numpy as np
import pytest

from alsiron.evaluation.qsmforward import score_cylinders, simulate_cylinders
from alsiron.qsm.chain import QsmParameters, process_series
from alsiron.qsm.inversion import InversionSettings

CHAINS = {
    "two_step": QsmParameters(inversion=InversionSettings(method="tvmasked")),
    "sstv": QsmParameters(),
    "sstv_stop20": QsmParameters(inversion=InversionSettings(
        method="sstv", sstv_refine_iter=20, sstv_refine_alpha=None)),
}


@pytest.fixture(scope="module")
def scored() -> dict[str, dict[str, float]]:
    case = simulate_cylinders(seed=0, surrounding="air")
    chis, masks = {}, {}
    for name, params in CHAINS.items():
        r = process_series(case.series, params)
        if name == "sstv":
            assert r.provenance["Steps"]["DipoleInversion"]["AlphaUsed"] == 2e-5
        masks[name] = r.qsm_mask.data > 0
        chis[name] = np.nan_to_num(r.chi.data).astype(np.float64)
    common = case.mask & np.logical_and.reduce(list(masks.values()))
    assert common.sum() > 0.6 * case.mask.sum()
    return {name: score_cylinders(chi, case, common) for name, chi in chis.items()}


def test_the_two_step_chain_recovers_qsmforwards_cylinders(scored) -> None:
    s = scored["two_step"]
    assert s["NRMSE_pct"] < 20.0
    assert s["XSIM"] > 0.55
    assert 0.9 <= s["CylinderSlope"] <= 1.1


def test_the_default_chain_sstv_recovers_them_better(scored) -> None:
    s = scored["sstv"]
    assert QsmParameters().inversion.method == "sstv"
    # Better than the two-step chain's NRMSE; its XSIM is lower (α 2e-5 leaves texture in
    # the flat cylinders, which a TV weight 35× larger removes).
    assert s["NRMSE_pct"] < scored["two_step"]["NRMSE_pct"]
    assert 0.9 <= s["CylinderSlope"] <= 1.1
    assert s["XSIM"] > 0.3


def test_a_regularised_first_pass_is_what_makes_it(scored) -> None:
    assert scored["sstv"]["NRMSE_pct"] < 0.6 * scored["sstv_stop20"]["NRMSE_pct"]
    assert scored["sstv"]["XSIM"] > scored["sstv_stop20"]["XSIM"] + 0.1


def test_an_unknown_surrounding_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown surrounding 'vacuum'"):
        simulate_cylinders(surrounding="vacuum")

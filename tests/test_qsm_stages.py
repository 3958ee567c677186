"""QSM-CI-style stage accuracy on the head phantom (docs/qsm_stages.md).

Dipole stage: χ from the phantom's true local field (simulated on a 2× finer grid, so not
the inversion's own kernel) with every inversion at its default parameters, scored with
DESIGN.md §5 metrics in the truth brain mask. Bounds are the measured values of
docs/qsm_stages.md plus a margin (NRMSE +3 points, XSIM −0.03), and the default-grade
method must beat the published dipole-stage leader (NRMSE 26.5 %, tuned TV-ADMM) with a
deep-grey slope in 0.9–1.1. The 96³ case of the table runs in bench/qsm_stages.py only
(≈ 40 s); here the 64³ isotropic and the oblique/anisotropic phantoms.
"""

from __future__ import annotations

import numpy as np
import pytest

from alsiron import qsm
from alsiron.evaluation import stages
from alsiron.evaluation.truth import score_chi
from alsiron.qsm import inversion
from alsiron.qsm.settings import QsmParameters

PUBLISHED_DIPOLE_LEADER_NRMSE = 26.5

#: Measured (NRMSE %, XSIM, deep-grey slope) per case and method, defaults (seed fixed).
MEASURED = {
    "64-3mm": {
        "tkd": (46.1, 0.609, 0.81),
        "tikhonov": (48.6, 0.528, 0.81),
        "ilsqr": (28.3, 0.771, 0.95),
        "tvadmm": (33.2, 0.823, 0.95),
        "tvmasked": (15.1, 0.939, 0.96),
        "tvadmm-wh": (19.0, 0.911, 0.98),
        "medi": (13.9, 0.978, 0.98),
        "rts": (25.9, 0.723, 0.99),
        "ndi": (43.5, 0.593, 0.75),
    },
    "oblique": {
        "tvadmm": (31.4, 0.826, 0.97),
        "tvmasked": (17.8, 0.903, 0.99),
        "tvadmm-wh": (20.8, 0.886, 1.00),
        "medi": (16.2, 0.949, 0.99),
        "rts": (27.0, 0.702, 1.05),
    },
}


@pytest.fixture(scope="module", params=list(MEASURED))
def phantom_case(request):
    session = stages.simulate(stages.CASES[request.param])
    return request.param, session, stages.truth_of(session)


def run(session, truth, key):
    if key == "tvadmm-wh":
        return stages.dipole_stage(session, "tvadmm",
                                   inversion.InversionSettings(tv_weak_harmonic=True), truth)
    return stages.dipole_stage(session, key, truth=truth)


def test_dipole_stage_metrics(phantom_case):
    case, session, truth = phantom_case
    scores = {}
    for key, (nrmse, xsim, slope) in MEASURED[case].items():
        s = run(session, truth, key)
        scores[key] = s
        assert s["NRMSE_pct"] < nrmse + 3, (key, s["NRMSE_pct"])
        assert s["XSIM"] > xsim - 0.03, (key, s["XSIM"])
        assert abs(s["DeepGreySlope"] - slope) < 0.06, (key, s["DeepGreySlope"])
        assert s["DeepGreyR2"] > 0.9, key
    best = min(scores, key=lambda k: scores[k]["NRMSE_pct"])
    assert best == "medi"
    medi = scores["medi"]
    assert medi["NRMSE_pct"] < PUBLISHED_DIPOLE_LEADER_NRMSE - 5
    assert 0.9 < medi["DeepGreySlope"] < 1.1
    assert medi["XSIM"] > 0.9
    # The two-step default (TV-ADMM with the masked data term) beats the leader too. (The
    # chain's default, sstv, inverts the total field, so it has no dipole stage.)
    default = scores[inversion.TWO_STEP_DEFAULT]
    assert default["NRMSE_pct"] < PUBLISHED_DIPOLE_LEADER_NRMSE - 5
    assert 0.9 < default["DeepGreySlope"] < 1.1
    assert default["NRMSE_pct"] < scores["tvadmm"]["NRMSE_pct"] - 10
    # iLSQR's record splits its two LSQR runs; RTS names its LSQR step 1.
    ilsqr = scores.get("ilsqr")
    if ilsqr is not None:
        rec = ilsqr["record"]
        assert rec["IterationsLSQR"] >= 1 and rec["IterationsStreaking"] >= 1
        assert rec["IterationsRun"] == rec["IterationsLSQR"] + rec["IterationsStreaking"]
        assert rec["Parameters"]["ilsqr_ill_threshold"] == 0.1
    assert "LSQR" in scores["rts"]["record"]["Step1"]
    assert scores["rts"]["record"]["Parameters"]["rts_lsqr_iter"] == 16
    # The provenance carries every parameter and the iterations run.
    record = medi["record"]
    assert record["Parameters"]["medi_alpha"] == inversion.InversionSettings().medi_alpha
    assert 1 <= record["IterationsRun"] <= record["Parameters"]["medi_max_iter"]


def test_wrong_b0_direction_costs_accuracy():
    session = stages.simulate(stages.CASES["oblique"])
    truth = stages.truth_of(session)
    right = stages.dipole_stage(session, "tvadmm", truth=truth)
    session.b0_direction = (0.0, 0.0, 1.0)  # a tool that ignores the affine
    wrong = stages.dipole_stage(session, "tvadmm", truth=truth)
    assert wrong["NRMSE_pct"] > right["NRMSE_pct"] + 10


def test_noise_scaled_alpha_is_the_floor_or_c_times_the_weighted_noise():
    mask = np.zeros((6, 6, 6), bool)
    mask[1:5, 1:5, 1:5] = True
    weight = np.where(mask, 0.5, 0.0)
    sd = np.where(mask, 2e-3, np.nan)
    sd[1, 1, 1] = np.inf  # unusable voxels are skipped
    alpha, sigma_w = inversion.noise_scaled_alpha(sd, weight, mask, base_alpha=1e-4,
                                                  factor=0.3)
    assert sigma_w == pytest.approx(1e-3)
    assert alpha == pytest.approx(3e-4)
    assert inversion.noise_scaled_alpha(sd / 100, weight, mask, base_alpha=1e-4,
                                        factor=0.3)[0] == 1e-4
    with pytest.raises(ValueError, match="shape"):
        inversion.noise_scaled_alpha(sd[:5], weight, mask, base_alpha=1e-4, factor=0.3)


def test_medi_noise_rule_beats_the_fixed_alpha_on_a_noisy_local_field():
    # Dipole stage with the true local field plus white noise of 10x the phantom's field
    # SD at SNR 100 (σ_f ≈ 4.5e-3 ppm): the fixed α = 1e-4 is tuned for clean data and
    # lets the noise through; the noise rule raises α to c·σ_W (measured on 64³/3 mm,
    # seed 3: NRMSE 51.1 % at α = 1e-4, 30.9 % at the best α = 1e-3 ≈ 0.37 σ_W).
    session = stages.simulate(stages.CASES["64-3mm"])
    truth = stages.truth_of(session)
    args = stages.dipole_inputs(session)
    rng = np.random.default_rng(7)
    sd = np.full(session.local_field.shape, 4.5e-3, np.float32)
    args["local_field"] = (session.local_field + sd * rng.standard_normal(sd.shape)
                           ).astype(np.float32)
    scores = {}
    for rule in ("fixed", "noise"):
        a = dict(args)
        chi, record = inversion.invert("medi", a.pop("local_field"), a.pop("mask"),
                                       settings=inversion.InversionSettings(
                                           medi_alpha_rule=rule), field_sd=sd, **a)
        chi = qsm.reference_to_mean(chi, session.brain_mask)
        scores[rule] = (score_chi(chi, session.brain_mask, truth), record)
    fixed, (noise, record) = scores["fixed"][0], scores["noise"]
    assert record["AlphaUsed"] > 5 * inversion.InversionSettings().medi_alpha
    assert record["WeightedNoiseSD_ppm"] > 1e-3
    assert noise["NRMSE_pct"] < fixed["NRMSE_pct"] - 10, (noise["NRMSE_pct"],
                                                        fixed["NRMSE_pct"])
    assert noise["XSIM"] > fixed["XSIM"] + 0.1


def test_two_step_chain_is_ahead_of_tv_admm_rts_and_medi():
    # Whole two-step chain on 64³/3 mm (seed 3), BET mask and 4 mm erosion; every inversion
    # on the chain's own local field. In the chain's own mask (cortical rim kept): two-step
    # default (TV-ADMM, masked data term) 64.9 %, plain TV-ADMM 69.1 %, RTS 81.9 %, MEDI 86.2 %
    # (its noise rule keeps α = 1e-4 at SNR 100). In the fixed stage-input mask (true
    # brain less two voxel layers): 48.6 / 56.3 / 58.8 / 57.5 %, XSIM 0.63 vs 0.50 / 0.44 /
    # 0.58 (docs/qsm_stages.md "Default of the chain"). Margins: 2 points on the lead
    # over TV-ADMM (measured 4.2 / 7.7), 10 on RTS and MEDI in the own mask.
    session = stages.simulate(stages.CASES["64-3mm"])
    two_step = QsmParameters(inversion=inversion.InversionSettings(
        method=inversion.TWO_STEP_DEFAULT))
    methods = [("tvadmm", None), ("rts", None), ("medi", None)]
    default, tv, rts, medi = stages.chain_inversions(session, methods, params=two_step)
    assert default.chi_nrmse_pct < 68.3 - 1  # the phase → χ leader, rim included
    assert default.chi_nrmse_pct < tv.chi_nrmse_pct - 2
    assert rts.chi_nrmse_pct > default.chi_nrmse_pct + 10
    assert medi.chi_nrmse_pct > default.chi_nrmse_pct + 10
    assert 0.9 < default.deep_grey_slope < 1.1
    fixed = stages.stage_input_mask(session, None)
    f_default, f_tv, f_rts, f_medi = stages.chain_inversions(session, methods,
                                                             params=two_step, eval_mask=fixed)
    assert f_default.chi_nrmse_pct < 51
    assert f_default.chi_nrmse_pct < min(f_tv.chi_nrmse_pct, f_rts.chi_nrmse_pct,
                                         f_medi.chi_nrmse_pct) - 5
    assert f_default.xsim > max(f_tv.xsim, f_rts.xsim, f_medi.xsim)
    assert "α 0.0001" in medi.method

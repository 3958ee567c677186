"""Background-removal stage and the chain from phase, measured the QSM-CI way.

Phantom: 64³, 3 mm, SNR 100, seed 3 (alsiron.evaluation.stages.simulate_stage_phantom), made
at 2x supersampling with a padded kernel, so no inverse crime. Stage input: the TRUE
total field and the true brain mask (eroded by the workflow's 2 voxels); χ from each
local field with the two-step default dipole inversion ("tvmasked", the chain's default
before the single-step "sstv", which takes no local field). Scores (DESIGN.md §5) in the
mask common to all methods (the intersection of their valid masks, so that a method is
not rewarded for eroding away the difficult rim) and in each method's own mask.

Measured (docs/qsm_stages_bfr.md) with the two-step inversion (TV-ADMM with the masked
data term, "tvmasked"), common mask: PDF local 24.9 %, χ 19.9 %, XSIM 0.83, slope 0.93;
V-SHARP 25.2 / 24.5 %; iSMV 39.8 / 34.9 %; LBV 69 / 85 %. Chain from phase (MCPC-3D-S +
ROMEO + complex fit + PDF + tvmasked): χ 20.9 % common, 48.6 % in the stage-input mask
(true brain less two voxel layers), 64.9 % own mask, slope 0.93. With the former default
(plain TV-ADMM): PDF χ 30.3 %, V-SHARP 27.5 %, iSMV 38.6 %, LBV 77.4 %; chain 32.6 /
56.3 / 69.1 %. The chain's 4 mm erosion keeps one more (cortical) voxel layer than the
stage's fixed 2 voxels (alsiron.evaluation.stages.STAGE_ERODE_VOXELS). These χ numbers follow the
default dipole inversion: re-measure them when it changes. Published leaders on the QSM-CI phantom:
28.1 % (background stage, iSMV), 39.1 % (total field → χ), 68.3 % (phase → χ).
Margins: 2-3 NRMSE points (the phantom is seeded, so they only absorb platform
round-off and small solver changes).
"""

from __future__ import annotations

import numpy as np
import pytest

from alsiron.evaluation import stages
from alsiron.qsm.inversion import TWO_STEP_DEFAULT, InversionSettings
from alsiron.qsm.settings import BFR_METHODS, QsmParameters

LEADER_BFR_LOCAL = 28.1
LEADER_TOTAL_TO_CHI = 39.1
LEADER_PHASE_TO_CHI = 68.3


@pytest.fixture(scope="module")
def session():
    return stages.simulate_stage_phantom(64, 3.0, seed=3)


@pytest.fixture(scope="module")
def common(session):
    return stages.common_mask(session, ["vsharp", "ismv", "lbv"])


@pytest.fixture(scope="module")
def stage(session, common):
    return {m: stages.bfr_stage(session, m, eval_mask=common) for m in BFR_METHODS}


def test_common_mask_is_large_enough(session, common):
    # Brain eroded by 2 voxels and by iSMV's 2-voxel sphere: ~60 % of the brain.
    assert 0.5 < common.sum() / session.brain_mask.sum() < 0.8


def test_default_bfr_beats_the_background_stage_leader(stage):
    best = stage[QsmParameters().background.method]
    assert best.local_nrmse_pct < LEADER_BFR_LOCAL - 1  # measured 24.9 %
    assert best.chi_nrmse_pct < LEADER_TOTAL_TO_CHI - 16  # measured 19.9 %
    assert best.xsim > 0.78  # measured 0.83
    assert 0.87 <= best.deep_grey_slope <= 1.1  # measured 0.93


def test_default_bfr_is_the_most_accurate(stage):
    default = stage[QsmParameters().background.method]
    others = [s for m, s in stage.items() if m != QsmParameters().background.method]
    # Best local field and best χ outright (χ 19.9 % vs V-SHARP 24.5 % with the default
    # inversion; with the plain TV-ADMM V-SHARP was 2.8 points ahead at 3 mm).
    assert default.local_nrmse_pct <= min(s.local_nrmse_pct for s in others)
    assert default.chi_nrmse_pct <= min(s.chi_nrmse_pct for s in others) - 2.0


@pytest.mark.parametrize("method, local_max, chi_max", [
    ("vsharp", 28.0, 28.0),  # measured 25.2 / 24.5
    ("ismv", 43.0, 38.0),  # measured 39.8 / 34.9
    # measured 69.4 / 84.9 (77.4 with the plain TV-ADMM, whose zero field outside the mask
    # damps LBV's boundary error): LBV's boundary condition leaks here
    ("lbv", 75.0, 88.0),
])
def test_every_method_on_the_true_total_field(stage, method, local_max, chi_max):
    s = stage[method]
    assert s.local_nrmse_pct < local_max
    assert s.chi_nrmse_pct < chi_max
    assert 0.78 < s.deep_grey_slope < 1.1


def test_two_step_chain_from_phase_beats_the_leader(session, common):
    p = QsmParameters(inversion=InversionSettings(method=TWO_STEP_DEFAULT))
    in_common = stages.phase_chain(session, p, eval_mask=common)
    own = stages.phase_chain(session, p)
    # The leader comparison in a mask that no method chooses: the stage-input mask (true
    # brain less its two outer voxel layers, 77 % of the brain), measured 48.6 % (plain
    # TV-ADMM 56.3 %).
    fixed = stages.phase_chain(session, p, eval_mask=stages.stage_input_mask(session, None))
    assert fixed.chi_nrmse_pct < LEADER_PHASE_TO_CHI - 16
    assert in_common.chi_nrmse_pct < 24.0  # measured 20.9 % (plain TV-ADMM 32.6 %)
    # Own mask: measured 64.9 % (plain TV-ADMM 69.1 %); the chain's 4 mm erosion keeps
    # one more voxel layer at the brain's edge (cortex), whose χ is the least accurate;
    # this bound guards against a regression of the rim (docs/qsm_mask_erosion.md).
    assert own.chi_nrmse_pct < 68
    assert 0.88 <= own.deep_grey_slope <= 1.1  # measured 0.93
    assert own.mask_voxels > in_common.mask_voxels


def test_default_chain_from_phase(session, common):
    """The default chain (sstv) from phase on the same phantom: it beats the leader in the
    stage-input mask but trails the two-step chain on this phantom everywhere.

    Measured: stage-input mask 63.4 % (two-step 48.6 %, leader 68.3 %), common mask 50.7 %
    (20.9 %), own mask 78.7 % (64.9 %; sstv's own mask is the whole phase-quality brain,
    99.5 % of it, outer voxel layer included, where the two-step chain's 4 mm erosion takes
    that layer off), XSIM 0.39 / 0.30 / 0.38, slope 1.035. The two-step chain was tuned on
    this phantom, whose compartments are flat; on the anatomical head the order reverses
    (docs/qsm_anatomy.md), and that is where the default was chosen. Bounds: measured + 3.
    """
    p = QsmParameters()
    assert p.inversion.method == "sstv"
    fixed = stages.phase_chain(session, p, eval_mask=stages.stage_input_mask(session, None))
    assert fixed.chi_nrmse_pct < LEADER_PHASE_TO_CHI - 3
    assert stages.phase_chain(session, p, eval_mask=common).chi_nrmse_pct < 54.0
    own = stages.phase_chain(session, p)
    assert own.chi_nrmse_pct < 82.0
    assert 0.9 <= own.deep_grey_slope <= 1.1
    assert own.mask_voxels > 0.98 * session.brain_mask.sum()


def test_stage_scores_fail_on_a_wrong_field(session, common):
    # Control: the stage score must see a missing background removal (total = local).
    s = stages.bfr_stage(session, QsmParameters().background.method, eval_mask=common)
    broken = stages._scores("none", session.total_field.astype(np.float32), common,
                                session, 0.0, None)
    assert broken.local_nrmse_pct > 3 * s.local_nrmse_pct

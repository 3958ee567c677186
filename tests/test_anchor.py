"""The refined single-step anchor (qsm.anchor): the brain field on a padded grid, the
refinement on the geometric phantom, and its refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from alsiron import qsm
from alsiron.qsm import anchor
from alsiron.qsm import inversion as inv
from alsiron.sim.phantom import simulate_subject


def test_brain_field_does_not_wrap_around():
    # A source next to one face: its field on the opposite face is small; a periodic
    # convolution without padding would put the source's near field there.
    shape, vs, b0 = (24, 20, 22), (1.0, 1.2, 1.5), (0.2, 0.1, 1.0)
    chi = np.zeros(shape, np.float32)
    chi[1:3, 8:12, 9:13] = 1.0
    brain = np.ones(shape, bool)
    padded = anchor.brain_field(chi, brain, voxel_size=vs, b0_dir=b0, pad_voxels=16)
    far = anchor.brain_field(chi, brain, voxel_size=vs, b0_dir=b0, pad_voxels=64)
    periodic = qsm.forward_field(chi, voxel_size=vs, b0_dir=b0)
    rel = np.abs(padded - far).max() / np.abs(far).max()
    assert rel < 0.01  # 16 voxels of padding: measured 0.07 % of the max
    # On the far face: periodic 0.068 ppm off, padded 1.4e-4 ppm.
    assert np.abs(periodic[-2:] - far[-2:]).max() > 50 * np.abs(padded[-2:] - far[-2:]).max()
    # Only χ inside the brain counts.
    outside = np.zeros(shape, bool)
    assert np.all(anchor.brain_field(chi, outside, voxel_size=vs, b0_dir=b0) == 0)


@pytest.fixture(scope="module")
def pair():
    """Control and ALS session of the 48³ / 4 mm geometric phantom (same seed, so the same
    noise), the brain mask, the mask eroded by one voxel, and each session's
    smooth-source PDF anchor of a single-step inversion."""
    sessions = [simulate_subject(matrix=48, voxel_size=4.0, rng=2, group=group)
                for group in ("control", "ALS")]
    s = sessions[0]
    brain = s.brain_mask.astype(bool)
    eroded = qsm.erode_mm(brain, s.voxel_size, 4.0)
    b0 = tuple(float(v) for v in s.b0_direction)
    anchors = []
    for session in sessions:
        total = np.where(brain, session.total_field, 0.0).astype(np.float32)
        local, _ = qsm.pdf(total, eroded, voxel_size=s.voxel_size, b0_dir=b0, tol=1e-6,
                           max_iter=25, source_smoothing=3e-4, source_mask=~brain)
        anchors.append(local)
    return sessions, brain, eroded, b0, anchors


def _kept(anchors, truths, mask):
    """ALS − control of the anchors projected on the true one within ``mask`` (1 = all
    of the excess's field kept), and the relative residual."""
    d, t = anchors[1] - anchors[0], truths[1] - truths[0]
    dd, tt = d[mask] - d[mask].mean(), t[mask] - t[mask].mean()
    return float(dd @ tt / (tt @ tt)), float(np.linalg.norm(dd - tt) / np.linalg.norm(tt))


def _refined(pair, settings):
    sessions, brain, eroded, b0, anchors = pair
    refined, masks, records = [], [], []
    for session, local in zip(sessions, anchors, strict=True):
        a, mask, record = anchor.refine_anchor(
            "sstv", session.total_field, brain, local, eroded, eroded,
            voxel_size=session.voxel_size, b0_dir=b0, settings=settings)
        assert mask.any() and not (mask & ~eroded).any()
        assert np.all(a[~mask] == 0) and np.isfinite(a).all()
        assert record["AnchorVoxels"] == mask.sum()
        refined.append(a)
        masks.append(mask)
        records.append(record)
    return refined, masks[0] & masks[1], records


def test_refined_anchor_keeps_more_of_the_als_excess(pair):
    sessions, _, _, _, anchors = pair
    refined, common, records = _refined(pair, inv.InversionSettings(method="sstv"))
    # The defaults: 80 first-pass iterations at the two-step default's α.
    assert all(r["FirstPassIterations"] == 80 and r["FirstPassAlpha"] == 7e-4 for r in records)
    truths = [s.local_field for s in sessions]
    kept_pdf, resid_pdf = _kept(anchors, truths, common)
    kept, resid = _kept(refined, truths, common)
    # Measured when written: the PDF anchor keeps 0.69 of the excess's field (residual
    # 0.58), the refined one 0.87 (0.35).
    assert kept > kept_pdf + 0.1, (kept_pdf, kept)
    assert resid < resid_pdf, (resid_pdf, resid)


def test_a_regularised_first_pass_gives_the_better_anchor(pair):
    # The refinement keeps the first pass's error in the anchor. A first pass at the final
    # pass's α (2e-5, 20 iterations: the stop-20 anchor) kept 0.84 of the excess's field,
    # residual 0.42; at α 7e-4, same iterations, 0.87 and 0.37.
    sessions = pair[0]
    truths = [s.local_field for s in sessions]
    weak, common_w, rw = _refined(pair, inv.InversionSettings(
        method="sstv", sstv_refine_iter=20, sstv_refine_alpha=None))
    strong, common_s, rs = _refined(pair, inv.InversionSettings(method="sstv",
                                                                sstv_refine_iter=20))
    assert rw[0]["FirstPassAlpha"] == inv.SSTV_ALPHA and rs[0]["FirstPassAlpha"] == 7e-4
    kept_w, resid_w = _kept(weak, truths, common_w)
    kept_s, resid_s = _kept(strong, truths, common_s)
    assert kept_s > kept_w and resid_s < resid_w - 0.02, (kept_w, resid_w, kept_s, resid_s)


def test_refine_anchor_refuses_zero_iterations(pair):
    sessions, brain, eroded, b0, anchors = pair
    settings = dataclasses.replace(inv.InversionSettings(method="sstv"), sstv_refine_iter=0)
    with pytest.raises(ValueError, match="sstv_refine_iter"):
        anchor.refine_anchor("sstv", sessions[0].total_field, brain, anchors[0], eroded,
                             eroded, voxel_size=sessions[0].voxel_size, b0_dir=b0,
                             settings=settings)

"""Precentral masks (label route), sub-regions and motor-cortex indices on the phantom."""

from __future__ import annotations

import numpy as np
import pytest

from alsiron.cohort.records import SessionRecord, index_units
from alsiron.errors import InputError
from alsiron.motor import labels
from alsiron.motor.indices import motor_cortex_indices, trimmed_voxels
from alsiron.sim.phantom import simulate_subject
from alsiron.sim.tissues import LABELS, PRECENTRAL_DEEP_LABELS, PRECENTRAL_LABELS, TISSUES

LUT = dict(enumerate(TISSUES.names))


@pytest.fixture(scope="module")
def pair():
    """Control and ALS phantom (64³, 3 mm) with the same noise and no subject offset."""
    kwargs = {"matrix": 64, "voxel_size": 3.0, "snr": 100.0}
    return (simulate_subject(group="control", rng=3, **kwargs),
            simulate_subject(group="ALS", rng=3, **kwargs))


def _true_masks(s):
    return labels.masks_from_labels(s.labels, s.affine, LUT, s.labels.shape, s.affine,
                                brain=s.brain_mask)


def test_label_route_reproduces_true_mask(pair):
    s = pair[0]
    m = _true_masks(s)
    truth = np.isin(s.labels, PRECENTRAL_LABELS)
    assert np.array_equal(m.precentral, truth)
    left = np.isin(s.labels, [LABELS["precentral_L_superficial"], LABELS["precentral_L_deep"]])
    assert np.array_equal(m.hemisphere == 1, left)
    # Distance-based depth bands against the phantom's own deep/superficial halves.
    true_deep = np.isin(s.labels, PRECENTRAL_DEEP_LABELS)
    agreement = float((m.deep[truth] == true_deep[truth]).mean())
    assert agreement >= 0.9, agreement
    # Segments: thirds along the gyrus, each present on both sides, leg on top.
    for side in (1, 2):
        for seg in (1, 2, 3):
            assert ((m.hemisphere == side) & (m.segment == seg)).sum() > 10
    z = np.argwhere(m.precentral)[:, 2]
    seg = m.segment[m.precentral]
    assert z[seg == 1].mean() > z[seg == 2].mean() > z[seg == 3].mean()


def test_freesurfer_style_labels_on_a_finer_grid(pair):
    s = pair[0]
    fs = np.zeros_like(s.labels, dtype=np.int32)
    x_left = np.indices(s.labels.shape)[0] < s.labels.shape[0] / 2
    fs[s.labels == LABELS["white_matter"]] = np.where(x_left, 2, 41)[
        s.labels == LABELS["white_matter"]]
    gm = s.labels == LABELS["cortical_gm"]
    fs[gm] = np.where(x_left, 1028, 2028)[gm]  # superior frontal
    fs[np.isin(s.labels, [20, 21])] = 1024
    fs[np.isin(s.labels, [22, 23])] = 2024
    fs[s.labels == LABELS["csf"]] = 24
    # Upsample 2x (nearest) with the matching half-voxel affine: a different grid.
    fine = fs.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_affine = s.affine @ np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25],
                                       [0, 0, 0.5, -0.25], [0, 0, 0, 1]])
    m = labels.masks_from_labels(fine, fine_affine, labels.freesurfer_lut(fine), s.labels.shape,
                             s.affine, brain=s.brain_mask)
    assert m.provenance["Resampled"]
    assert np.array_equal(m.precentral, np.isin(s.labels, PRECENTRAL_LABELS))


def test_lut_reading_and_classification(tmp_path):
    tsv = tmp_path / "dseg.tsv"
    tsv.write_text("index\tname\n0\tair\n5\twhite_matter\n20\tprecentral_L_deep\n"
                   "22\tprecentral_R_superficial\n")
    assert labels.read_lut(tsv)[20] == "precentral_L_deep"
    fslut = tmp_path / "FreeSurferColorLUT.txt"
    fslut.write_text("# comment\n1024    ctx-lh-precentral  60 20 220 0\n"
                     "11129 ctx_lh_G_precentral 1 2 3 0\n11146 ctx_lh_S_precentral-inf-part"
                     " 1 2 3 0\n3024 wm-lh-precentral 1 2 3 0\n")
    classes = labels.classify_lut(labels.read_lut(fslut))
    assert sorted(classes["precentral_L"]) == [1024, 11129]
    assert 3024 in classes["wm"] and 11146 not in classes["precentral_L"]


def test_lut_without_precentral_is_refused(pair):
    s = pair[0]
    with pytest.raises(InputError, match="no precentral label"):
        labels.masks_from_labels(s.labels, s.affine, {5: "white_matter", 6: "cortical_gm"},
                             s.labels.shape, s.affine)


def test_labels_without_overlap_are_refused(pair):
    s = pair[0]
    far = s.affine.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(InputError, match="does not overlap"):
        labels.masks_from_labels(s.labels, far, LUT, s.labels.shape, s.affine)


def _reference(values_map, mask):
    vals = values_map[mask]
    return float(vals.mean())


def test_indices_match_true_maps_in_true_mask(pair):
    s = pair[1]
    m = _true_masks(s)
    res = motor_cortex_indices(m, chi=s.chi, r2star=s.r2star)
    truth = np.isin(s.labels, PRECENTRAL_LABELS)
    for name, data in (("chi", s.chi), ("r2star", s.r2star)):
        ref = _reference(data, truth)
        got = res.indices[f"{name}_precentral_mean"]
        assert abs(got - ref) <= 0.05 * abs(ref), (name, got, ref)
    assert res.indices["chi_precentral_n"] >= 0.96 * truth.sum()
    assert all(index_units(k) for k in res.indices)
    assert res.qc_status == "pass"
    assert res.qc_notes["precentral_lost_to_mask"] == 0.0


def test_als_excess_localised_to_deep_band(pair):
    control, als = pair
    m = _true_masks(control)
    r2s_c = motor_cortex_indices(m, chi=control.chi, r2star=control.r2star).indices
    r2s_a = motor_cortex_indices(m, chi=als.chi, r2star=als.r2star).indices
    excess = als.parameters["als_precentral_excess_ppm"]
    d_deep = r2s_a["chi_precentral_deep_mean"] - r2s_c["chi_precentral_deep_mean"]
    d_sup = r2s_a["chi_precentral_superficial_mean"] - r2s_c["chi_precentral_superficial_mean"]
    d_all = r2s_a["chi_precentral_mean"] - r2s_c["chi_precentral_mean"]
    # Block-averaged truth: the deep band carries most of the excess, the superficial
    # band only what partial volume spills into it.
    assert d_deep > 1.5 * excess and d_deep > 2.0 * d_sup, (d_deep, d_sup)
    assert 0.6 * excess < d_all < 1.4 * excess
    r_deep = r2s_a["r2star_precentral_deep_mean"] - r2s_c["r2star_precentral_deep_mean"]
    r_sup = (r2s_a["r2star_precentral_superficial_mean"]
             - r2s_c["r2star_precentral_superficial_mean"])
    assert r_deep > 2.0 * r_sup > 0
    assert r2s_a["chi_precentral_deepminusSuperficial_mean"] > \
        r2s_c["chi_precentral_deepminusSuperficial_mean"]


def test_contrasts_and_record(pair):
    s = pair[1]
    m = _true_masks(s)
    res = motor_cortex_indices(m, chi=s.chi, r2star=s.r2star)
    ix = res.indices
    assert ix["chi_precentral_LminusR_mean"] == pytest.approx(
        ix["chi_precentral_L_mean"] - ix["chi_precentral_R_mean"])
    # Precentral cortex (≈ +19 ppb + ALS) against white matter (−25 ppb): clearly positive.
    assert ix["chi_precentral_minusWM_mean"] > 0.02
    assert ix["chi_precentral_minusControl_mean"] == pytest.approx(
        ix["chi_precentral_mean"] - ix["chi_control_mean"])
    assert ix["chi_control_n"] > 50
    rec = res.update_record(SessionRecord(subject="sub-02", session="ses-01"))
    assert "chi_precentral_deep_mean" in rec.indices
    assert rec.qc_notes["precentral_lost_to_mask"] == 0.0


def test_vein_trimming_removes_upper_tail(pair):
    s = pair[0]
    m = _true_masks(s)
    chi = s.chi.copy()
    rng = np.random.default_rng(0)
    idx = np.argwhere(m.precentral)
    veins = idx[rng.choice(len(idx), size=len(idx) // 50, replace=False)]
    chi[tuple(veins.T)] = 0.4
    trimmed = motor_cortex_indices(m, chi=chi).indices
    untrimmed = motor_cortex_indices(m, chi=chi, vein_percentile=100.0).indices
    clean = motor_cortex_indices(m, chi=s.chi).indices
    assert untrimmed["chi_precentral_mean"] - clean["chi_precentral_mean"] > 0.005
    assert abs(trimmed["chi_precentral_mean"] - clean["chi_precentral_mean"]) < 0.001
    keep = trimmed_voxels(m.precentral, chi, None)
    assert not keep[tuple(veins.T)].any()


def test_mask_loss_is_reported(pair):
    s = pair[0]
    m = _true_masks(s)
    chi = s.chi.copy()
    z = np.argwhere(m.precentral)[:, 2]
    top = np.percentile(z, 75)
    chi[:, :, int(top):] = np.nan  # a brain mask eroded at the vertex
    res = motor_cortex_indices(m, chi=chi, r2star=s.r2star)
    notes = res.qc_notes
    assert notes["precentral_top_lost_to_mask"] > 0.9
    assert 0.1 < notes["precentral_lost_to_mask"] < 0.5
    assert notes["precentral_leg_lost_to_mask"] > notes["precentral_face_lost_to_mask"]
    assert res.qc_status == "warn"

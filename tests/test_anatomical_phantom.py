"""The anatomical head phantom (alsiron.sim.anatomical) at 4 mm: tissues, precentral
bands, head around the brain, sinuses, BET on its neck, per-participant anatomy, ALS
excess, and a written dataset that ``alsiron qsm`` accepts with default settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from alsiron.field.brain_mask import bet
from alsiron.sim import anatomical as an
from alsiron.sim.tissues import LABELS, PRECENTRAL_DEEP_LABELS, PRECENTRAL_LABELS, TISSUES

VOXEL = 4.0


@pytest.fixture(scope="module")
def control() -> object:
    return an.simulate_anatomical_subject(voxel_size=VOXEL, anatomy_seed=(0, 1), rng=0,
                                          snr=None)


@pytest.fixture(scope="module")
def als() -> object:
    return an.simulate_anatomical_subject(voxel_size=VOXEL, anatomy_seed=(0, 1), rng=0,
                                          snr=None, group="ALS")


@pytest.fixture(scope="module")
def fine_labels(control) -> np.ndarray:
    anatomy = an.Anatomy.draw(np.random.default_rng((0, 1)), [
        n * VOXEL for n in control.labels.shape])
    return an.build_fine_head(anatomy, control.labels.shape, (VOXEL,) * 3, 2)[2]


def test_every_tissue_class_is_present(control) -> None:
    present = set(np.unique(control.labels).tolist())
    missing = [TISSUES.names[i] for i in range(len(TISSUES.names)) if i not in present]
    assert not missing


def test_precentral_bands_lie_in_grey_matter(control, fine_labels) -> None:
    fine = fine_labels
    for name in ("precentral_L_superficial", "precentral_L_deep",
                 "precentral_R_superficial", "precentral_R_deep"):
        assert (fine == LABELS[name]).sum() > 100, name
    truth = dict((s, d) for s, d, _ in control.extra_truth)
    left, right = truth["desc-precentralL_mask"] > 0, truth["desc-precentralR_mask"] > 0
    deep = truth["desc-precentraldeep_mask"] > 0
    assert left.sum() > 20 and right.sum() > 20 and deep.sum() > 20
    assert not np.any(left & right)
    assert np.all(deep <= (left | right))
    # Left is on the subject's left (i increases to the right).
    xs = np.nonzero(left)[0].mean(), np.nonzero(right)[0].mean()
    assert xs[0] < xs[1]
    # Inside the brain, and the segments cover the precentral cortex.
    assert np.all(control.brain_mask[left | right])
    seg = truth["desc-somatotopy_dseg"]
    assert set(np.unique(seg[left | right]).tolist()) <= {1, 2, 3}
    assert len(np.unique(seg[left | right])) == 3


def test_head_surrounds_the_brain(control) -> None:
    from scipy import ndimage

    brain = control.brain_mask
    shell = ndimage.binary_dilation(brain, iterations=3) & ~brain
    labels = control.labels[shell]
    # Extracranial tissue: bone, scalp and (below the skull base) the neck's fat, muscle
    # and marrow.
    extracranial = [LABELS[n] for n in ("bone", "scalp", "fat", "muscle", "marrow")]
    assert np.mean(np.isin(labels, extracranial)) > 0.9
    far = ~ndimage.binary_dilation(brain, iterations=5)
    assert np.any(control.labels[far] == LABELS["air"])
    # Above the brain: bone, then scalp, then air along the vertical.
    i, j = brain.shape[0] // 2, brain.shape[1] // 2
    column = control.labels[i, j, :]
    top = int(np.nonzero(brain[i, j, :])[0].max())
    above = column[top + 1:]
    assert LABELS["bone"] in above and LABELS["scalp"] in above and above[-1] == LABELS["air"]


def test_sinus_air_lies_below_the_frontal_lobe(control) -> None:
    sinus = control.labels == LABELS["sinus_air"]
    assert sinus.sum() > 10
    brain = control.brain_mask
    si, sj, sk = (np.nonzero(sinus)[a].mean() for a in range(3))
    front = brain & (np.arange(brain.shape[1])[None, :, None] > sj)
    bi, bj, bk = (np.nonzero(brain)[a].mean() for a in range(3))
    assert abs(si - bi) < 3                      # near the midline
    assert sj > bj                               # anterior half
    assert sk < np.nonzero(front)[2].mean()      # below the frontal brain above it
    assert not np.any(sinus & brain)


def test_participants_differ_in_anatomy(control) -> None:
    other = an.simulate_anatomical_subject(voxel_size=VOXEL, anatomy_seed=(0, 2), rng=0,
                                           snr=None)
    a, b = control.brain_mask, other.brain_mask
    dice = 2 * np.sum(a & b) / (a.sum() + b.sum())
    assert 0.8 < dice < 0.99


def test_als_deep_band_carries_the_drawn_excess(control, als, fine_labels) -> None:
    deep_fraction = als.parameters["precentral_deep_fraction"]
    assert als.parameters["als_precentral_excess_ppm"] == pytest.approx(0.003)
    excess = als.parameters["als_precentral_excess_ppm"] / deep_fraction
    deep_fine = np.isin(fine_labels, PRECENTRAL_DEEP_LABELS)
    precentral_fine = np.isin(fine_labels, PRECENTRAL_LABELS)
    assert deep_fraction == pytest.approx(deep_fine.sum() / precentral_fine.sum())
    # The excess sits on the fine deep band only: its integral over the output grid is
    # the excess times the band's volume (8 fine voxels per output voxel).
    diff = als.chi_full.astype(np.float64) - control.chi_full
    assert diff.min() > -1e-7 and diff.max() <= excess * (1 + 1e-4)
    assert diff.sum() * 8 == pytest.approx(excess * deep_fine.sum(), rel=1e-3)
    # In the demeaned truth, deep-band voxels exceed the control's (beyond the global
    # shift of the brain mean, read where nothing changed) by the excess times their
    # deep fraction.
    same = (control.labels == LABELS["white_matter"]) & (diff == 0)
    shift = float(np.mean(als.chi[same] - control.chi[same]))
    deep = np.isin(als.labels, PRECENTRAL_DEEP_LABELS)
    gain = (als.chi - control.chi)[deep] - shift
    assert np.allclose(gain, diff[deep], atol=2e-6)
    assert gain.mean() > 0.5 * excess


def test_shim_is_harmonic_and_flattens_the_field_over_the_brain(control) -> None:
    from scipy import ndimage

    from alsiron.sim.phantom import SHIM_TERMS, SHIM_UNIT_MM, shim_basis

    unshimmed = an.simulate_anatomical_subject(voxel_size=VOXEL, anatomy_seed=(0, 1), rng=0,
                                               snr=None, shim=False)
    shim = control.parameters["b0_shim"]
    assert "b0_shim" not in unshimmed.parameters
    assert shim["terms"] == list(SHIM_TERMS) and len(shim["coefficients_ppm"]) == 9
    # The brain's own field and χ truth do not see the shim; the phase does.
    assert np.array_equal(control.local_field, unshimmed.local_field)
    assert np.array_equal(control.chi, unshimmed.chi)
    assert np.abs(control.phase - unshimmed.phase).max() > 1.0
    # What was removed is the recorded polynomial (at voxel centres: the block mean of a
    # harmonic quadratic on an isotropic grid is its centre value) and it is harmonic.
    removed = unshimmed.total_field.astype(np.float64) - control.total_field
    axes = [((np.arange(n) + 0.5) * VOXEL - n * VOXEL / 2.0) / SHIM_UNIT_MM
            for n in removed.shape]
    model = sum(c * t for c, t in zip(shim["coefficients_ppm"],
                                      shim_basis(*np.ix_(*axes)), strict=True))
    scale = np.abs(removed).max()
    assert scale > 0.1
    assert np.abs(removed - model).max() < 1e-4 * scale
    assert np.abs(ndimage.laplace(removed)[1:-1, 1:-1, 1:-1]).max() < 1e-4 * scale
    # It lowers the spread of the field over the brain, as recorded.
    brain = control.brain_mask
    before, after = unshimmed.total_field[brain].std(), control.total_field[brain].std()
    assert after < 0.75 * before
    assert shim["field_sd_in_region_after_ppm"] < 0.75 * shim["field_sd_in_region_before_ppm"]
    assert after == pytest.approx(shim["field_sd_in_region_after_ppm"], rel=0.1)


def test_default_bet_finds_the_brain_not_the_neck(control) -> None:
    # The face/neck (fat, muscle, pharynx, vertebra, a neck narrower than the head) must
    # not draw BET's surface below the skull base, as the uniform column once did.
    mask = bet(control.magnitude[0], control.voxel_size).mask
    brain = control.brain_mask
    assert 2 * np.count_nonzero(mask & brain) / (mask.sum() + brain.sum()) > 0.95
    assert np.count_nonzero(mask & ~brain) < 0.03 * brain.sum()


def test_written_dataset_runs_through_qsm(tmp_path) -> None:
    from alsiron.cli import cli

    out = tmp_path / "anat"
    runner = CliRunner()
    res = runner.invoke(cli, ["phantom", str(out), "--anatomy", "template", "--voxel-size",
                              "4", "--subjects", "1"])
    assert res.exit_code == 0, res.output
    truth = out / "derivatives" / "phantom" / "sub-01" / "ses-01" / "anat"
    assert (truth / "sub-01_ses-01_dseg.tsv").is_file()
    assert (truth / "sub-01_ses-01_desc-precentraldeep_mask.nii.gz").is_file()
    sidecar = json.loads((truth / "sub-01_ses-01_desc-total_fieldmap.json").read_text())
    assert sidecar["PhantomParameters"]["b0_shim"]["order"] == 2
    assert "shim" in sidecar["Description"]
    # Default settings, the default (BET) brain mask included.
    res = runner.invoke(cli, ["qsm", str(out / "sub-01"), "--no-registry"])
    assert res.exit_code == 0, res.output
    assert "labels route" in res.output
    chi = out / "derivatives" / "alsiron" / "sub-01" / "ses-01" / "anat" / \
        "sub-01_ses-01_Chimap.nii.gz"
    assert chi.is_file()

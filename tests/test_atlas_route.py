"""Atlas route on the phantom: the phantom's own magnitude + true precentral label serve as
"template + atlas"; the subject is the same head after a known affine and a smooth warp.
The code path (tissue model → dipy affine + SyN → warp → grey-matter restriction) is the
one used with the bundled MNI template."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from alsiron.errors import RegistrationError
from alsiron.grid import world_coordinates
from alsiron.motor import atlas
from alsiron.motor.indices import motor_cortex_indices, trimmed_voxels
from alsiron.motor.registration import RegistrationParameters
from alsiron.sim.phantom import simulate_subject
from alsiron.sim.tissues import LABELS, PRECENTRAL_LABELS


def _deformation(shape, affine):
    """Template-space voxel coordinates of every subject voxel: rotation 6° about x,
    scale 1.04, shift (4, -5, 3) mm, plus a smooth sinusoidal warp of 2.5-3 mm."""
    ang = np.deg2rad(6.0)
    rot = 1.04 * np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)],
                           [0, np.sin(ang), np.cos(ang)]])
    xyz = world_coordinates(shape, affine).reshape(3, -1).astype(np.float64)
    q = rot @ xyz + np.array([4.0, -5.0, 3.0])[:, None]
    q[0] += 3.0 * np.sin(2 * np.pi * xyz[2] / 120.0)
    q[1] += 3.0 * np.sin(2 * np.pi * xyz[0] / 100.0)
    q[2] += 2.5 * np.cos(2 * np.pi * xyz[1] / 140.0)
    return (np.linalg.inv(affine) @ np.vstack([q, np.ones(q.shape[1])]))[:3]


@pytest.fixture(scope="module")
def case():
    s = simulate_subject(matrix=64, voxel_size=3.0, rng=1)
    mag = s.magnitude[0]
    pre = np.isin(s.labels, PRECENTRAL_LABELS)
    left = np.isin(s.labels, [LABELS["precentral_L_superficial"], LABELS["precentral_L_deep"]])
    template = atlas.AtlasTemplate(
        image=np.where(s.brain_mask, mag, 0.0).astype(np.float32), affine=s.affine,
        contrast="gre", left=left.astype(np.float32), right=(pre & ~left).astype(np.float32),
        control=np.zeros(mag.shape, np.float32), maps_affine=s.affine, threshold=0.5,
        description="phantom as its own template")
    coords = _deformation(mag.shape, s.affine)

    def warp(img, order):
        return ndimage.map_coordinates(np.asarray(img, np.float32), coords, order=order,
                                       mode="constant").reshape(mag.shape)

    subject = {"magnitude": warp(mag, 1), "brain": warp(s.brain_mask, 0) > 0.5,
               "precentral": warp(pre, 0) > 0.5, "r2star": warp(s.r2star, 1),
               "chi": warp(s.chi, 1)}
    masks = atlas.masks_from_atlas(subject["magnitude"], s.affine, subject["brain"],
                                template=template)
    return s, template, subject, masks


def test_atlas_route_dice(case):
    _, _, subject, masks = case
    truth = subject["precentral"]
    dice = 2 * (masks.precentral & truth).sum() / (masks.precentral.sum() + truth.sum())
    assert dice >= 0.75, dice
    reg = masks.provenance["Registration"]
    assert reg["SyNUsed"] and reg["CorrelationFinal"] > reg["CorrelationAfterAffine"]
    # Both hemispheres and all three segments found.
    for side in (1, 2):
        for seg in (1, 2, 3):
            assert ((masks.hemisphere == side) & (masks.segment == seg)).any()


def test_atlas_route_indices_close_to_truth(case):
    _, _, subject, masks = case
    got = motor_cortex_indices(masks, r2star=subject["r2star"]).indices
    truth = subject["precentral"]
    # Same statistic (upper 3 % trimmed) of the same map inside the true mask.
    keep = trimmed_voxels(truth, None, subject["r2star"])
    ref = float(subject["r2star"][keep].mean())
    assert abs(got["r2star_precentral_mean"] - ref) <= 0.05 * ref, (got, ref)
    got_chi = motor_cortex_indices(masks, chi=subject["chi"]).indices["chi_precentral_mean"]
    keep = trimmed_voxels(truth, subject["chi"], None)
    ref_chi = float(subject["chi"][keep].mean())
    assert abs(got_chi - ref_chi) <= 0.05 * abs(ref_chi), (got_chi, ref_chi)


def test_registration_failure_is_reported(case):
    s, template, subject, _ = case
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 1, subject["magnitude"].shape).astype(np.float32)
    quick = RegistrationParameters(affine_iters=(10,), syn_iters=(5,))
    with pytest.raises(RegistrationError, match="did not converge"):
        atlas.masks_from_atlas(noise, s.affine, subject["brain"], template=template,
                            registration_params=quick, magnitude_name="noise.nii.gz")


def test_bundled_atlas_is_found():
    tpl = atlas.load_bundled_atlas("ho")
    assert tpl.image.shape == (182, 218, 182)
    # Harvard-Oxford precentral gyrus at >= 25 %: about 40 mL per side (1 mm voxels).
    vol_left = float((tpl.left >= tpl.threshold).sum()) / 1000.0
    assert 30.0 < vol_left < 50.0
    world = world_coordinates(tpl.left.shape, tpl.maps_affine)
    sel = tpl.left >= tpl.threshold
    assert world[0][sel].mean() < 0 < world[0][tpl.right >= tpl.threshold].mean()


def test_bundled_juelich_motor_cortex():
    tpl = atlas.load_bundled_atlas("juelich")
    sel = tpl.left >= tpl.threshold
    # BA4a + BA4p at >= 25 %: about 30 mL per side, behind the HO gyrus centre, high up.
    assert 20.0 < sel.sum() / 1000.0 < 40.0
    world = world_coordinates(tpl.left.shape, tpl.maps_affine)
    assert world[0][sel].mean() < 0 and world[2][sel].mean() > 40.0


def test_atlas_route_prefers_the_session_t1w(case, tmp_path, monkeypatch):
    """A same-session T1w (another grid) is found, resampled and registered to; the GRE
    magnitude handed over is pure noise, so only the T1w can give a good mask. As with
    the bundled MNI T1 template, template and subject share the T1 contrast: a T1w
    phantom made from the truth labels."""
    import nibabel as nib

    from alsiron.runs import roi as roi_workflow

    s, template, subject, _ = case
    coords = _deformation(s.labels.shape, s.affine)
    labels = ndimage.map_coordinates(s.labels.astype(np.float32), coords, order=0,
                                     mode="constant").reshape(s.labels.shape).astype(int)
    t1_of_label = np.full(max(LABELS.values()) + 1, 0.65, np.float32)  # grey matter
    t1_of_label[[LABELS["air"], LABELS["bone"], LABELS["sinus_air"]]] = 0.0
    t1_of_label[LABELS["csf"]] = 0.25
    t1_of_label[LABELS["white_matter"]] = 1.0
    t1_of_label[LABELS["cortical_gm"]] = 0.65
    t1_of_label[list(PRECENTRAL_LABELS)] = 0.65
    t1 = np.pad(t1_of_label[labels], 4)
    t1_affine = s.affine.copy()
    t1_affine[:3, 3] -= s.affine[:3, :3] @ np.array([4.0, 4.0, 4.0])
    anat = tmp_path / "sub-01" / "ses-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(nib.Nifti1Image(t1, t1_affine), str(anat / "sub-01_ses-01_T1w.nii.gz"))
    t1_template = atlas.AtlasTemplate(
        image=np.where(s.brain_mask, t1_of_label[s.labels], 0.0).astype(np.float32),
        affine=s.affine, contrast="t1w", left=template.left, right=template.right,
        control=template.control, maps_affine=s.affine, threshold=0.5,
        description="T1w phantom as its own template")
    monkeypatch.setattr(atlas, "load_bundled_atlas", lambda name="ho": t1_template)

    noise = np.random.default_rng(1).uniform(0, 1, s.labels.shape).astype(np.float32)
    masks = roi_workflow.region_masks(noise, s.affine, subject["brain"],
                                      roi_workflow.RoiOptions(), dataset_root=tmp_path,
                                      entities={"sub": "01", "ses": "01"})
    assert masks.provenance["SubjectImage"].endswith("sub-01_ses-01_T1w.nii.gz")
    assert masks.provenance["SubjectContrast"] == "t1w"
    truth = subject["precentral"]
    dice = 2 * (masks.precentral & truth).sum() / (masks.precentral.sum() + truth.sum())
    assert dice >= 0.75, dice


#: Measured 0.756 (defaults, seed 1, 4 mm; 0.752 with CC radius 3 and cropping): the
#: run is deterministic, the margin covers dipy/BLAS differences across machines.
ANAT_DICE_MIN = 0.70


def test_bundled_atlas_on_the_anatomical_phantom():
    """Default settings (coarse working grid, labels warped once): the bundled MNI
    template + Harvard-Oxford precentral gyrus registered to a deformed anatomical head
    at 4 mm (GRE magnitude) overlap the phantom's own precentral gyrus."""
    from alsiron.sim.anatomical import simulate_anatomical_subject

    s = simulate_anatomical_subject(voxel_size=4.0, anatomy_seed=1, rng=0)
    truth = np.isin(s.labels, PRECENTRAL_LABELS)
    masks = atlas.masks_from_atlas(s.magnitude[0], s.affine, s.brain_mask)
    dice = 2 * (masks.precentral & truth).sum() / (masks.precentral.sum() + truth.sum())
    assert dice >= ANAT_DICE_MIN, dice

"""Partial-volume-corrected band values (alsiron.motor.pvc): exact on a map that is the
block average of a finer labelled truth, where the plain band mean is diluted; absent when
the label image is not finer than the maps; the finest label image is the one found."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from alsiron.cohort.records import PARTIAL_VOLUME_INDEX
from alsiron.io.atomic import save_nifti, save_text
from alsiron.motor import labels, pvc
from alsiron.motor.indices import motor_cortex_indices
from alsiron.motor.masks import DEEP_DEPTH_THRESHOLD, cortical_depth

LUT = {1: "white_matter", 2: "precentral_L", 3: "cortical_gm", 4: "csf"}
#: χ of each tissue [ppm]; the precentral cortex's deep and superficial halves differ.
CHI = {"wm": -0.03, "deep": 0.035, "superficial": 0.01, "cortex": 0.015, "csf": 0.0}
COARSE_MM, FACTOR, N = 3.0, 2, 24


def _shell_head():
    """Fine labels (1.5 mm): a white-matter ball, a 6 mm cortical ribbon (precentral on
    one side) and CSF, centred off the coarse grid so that no boundary follows it."""
    n = N * FACTOR
    h = COARSE_MM / FACTOR
    x, y, z = (np.indices((n, n, n)) + 0.5) * h - N * COARSE_MM / 2 - 0.8
    r = np.sqrt(x * x + y * y + z * z)
    lab = np.zeros((n, n, n), np.int32)
    lab[r < 31.0] = 4
    lab[r < 25.0] = 3
    lab[(r < 25.0) & (y < 0.0)] = 2
    lab[r < 19.0] = 1
    fine_affine = np.diag([h, h, h, 1.0])
    fine_affine[:3, 3] = -N * COARSE_MM / 2 + h / 2
    coarse_affine = np.diag([COARSE_MM] * 3 + [1.0])
    coarse_affine[:3, 3] = -N * COARSE_MM / 2 + COARSE_MM / 2
    return lab, fine_affine, coarse_affine


def _truth_chi(lab):
    cortex = np.isin(lab, [2, 3])
    depth = cortical_depth(cortex, lab == 1, (COARSE_MM / FACTOR,) * 3)
    pre = lab == 2
    chi = np.zeros(lab.shape)
    chi[lab == 1] = CHI["wm"]
    chi[lab == 3] = CHI["cortex"]
    chi[pre] = CHI["superficial"]
    chi[pre & (depth < DEEP_DEPTH_THRESHOLD)] = CHI["deep"]
    return chi


def _block_mean(a):
    return a.reshape(N, FACTOR, N, FACTOR, N, FACTOR).mean(axis=(1, 3, 5))


@pytest.fixture(scope="module")
def shell():
    lab, fine_affine, coarse_affine = _shell_head()
    chi = _block_mean(_truth_chi(lab)).astype(np.float32)
    masks = labels.masks_from_labels(lab, fine_affine, LUT, (N, N, N), coarse_affine)
    return lab, fine_affine, coarse_affine, chi, masks


def test_gtm_is_exact_where_the_band_mean_is_diluted(shell):
    *_, chi, masks = shell
    assert masks.partial_volume is not None
    assert masks.provenance["PartialVolume"]["LabelVoxelsPerMapVoxel"] == pytest.approx(8.0)
    found = motor_cortex_indices(masks, chi=chi, r2star=np.full(chi.shape, 20.0, np.float32))
    got = found.indices
    # χ only: R2* does not mix linearly over a voxel's tissues.
    assert not any(k.startswith("r2star") and k.endswith("_gtm") for k in got)
    assert got["chi_precentral_deep_gtm"] == pytest.approx(CHI["deep"], abs=1e-6)
    assert got["chi_precentral_superficial_gtm"] == pytest.approx(CHI["superficial"], abs=1e-6)
    assert got[PARTIAL_VOLUME_INDEX] == pytest.approx(CHI["deep"] - CHI["wm"], abs=1e-6)
    # The plain mean over the voxels called deep on the 3 mm grid mixes the bands and WM.
    plain = got["chi_precentral_deep_mean"]
    assert abs(plain - CHI["deep"]) > 0.005, plain
    fits = found.parameters["PartialVolumeFits"]["chi"]
    assert fits["voxels"] > 100 and np.isfinite(fits["condition"])


def test_gtm_with_noise_is_unbiased(shell):
    *_, chi, masks = shell
    rng = np.random.default_rng(5)
    deep = []
    for _ in range(20):
        noisy = chi + rng.normal(0.0, 0.01, chi.shape).astype(np.float32)
        values, _ = pvc.gtm_region_values(noisy, masks.partial_volume, trim_percentile=100.0)
        deep.append(values[pvc.DEEP])
    # 20 draws of 0.01 ppm noise: the mean lands within 4 standard errors.
    se = np.std(deep, ddof=1) / np.sqrt(len(deep))
    assert abs(np.mean(deep) - CHI["deep"]) < 4 * se + 1e-4


def test_contrast_to_the_white_matter_beside_it_ignores_a_smooth_error(shell):
    """A smooth error over the head (as a QSM chain's background and anchor residue) moves
    a contrast of uniform region values but not the contrast against the white matter at
    the same place, which a second-order polynomial stands in for."""
    *_, chi, masks = shell
    x, y, z = (np.indices(chi.shape) - N / 2) * COARSE_MM / 50.0
    # About ±10 ppb over the cortex, the size of the chain's error on the vertex; the
    # precentral half of the shell (y < 0) sits lower on the gradient than its white matter.
    smooth = (0.02 * y + 0.008 * x - 0.006 * z + 0.01 * y * y
              - 0.005 * x * z).astype(np.float32)
    regions = masks.partial_volume
    uniform, _ = pvc.gtm_region_values(chi + smooth, regions, trim_percentile=100.0)
    contrasts, diag = pvc.gtm_contrasts(chi + smooth, regions, trim_percentile=100.0)
    want = CHI["deep"] - CHI["wm"]
    assert contrasts[pvc.DEEP] == pytest.approx(want, abs=1e-6)
    assert contrasts[pvc.SUPERFICIAL] == pytest.approx(CHI["superficial"] - CHI["wm"],
                                                       abs=1e-6)
    assert contrasts[pvc.WHITE_MATTER] == 0.0 and diag["baseline_order"] == pvc.BASELINE_ORDER
    assert abs(uniform[pvc.DEEP] - uniform[pvc.WHITE_MATTER] - want) > 5e-4, uniform  # 1.1 ppb
    # Order 0 is the uniform fit's contrast.
    flat, _ = pvc.gtm_contrasts(chi + smooth, regions, trim_percentile=100.0, order=0)
    assert flat[pvc.DEEP] == pytest.approx(uniform[pvc.DEEP] - uniform[pvc.WHITE_MATTER],
                                           abs=1e-6)


def test_no_gtm_on_the_maps_own_grid(shell):
    lab, _, coarse_affine, chi, _ = shell
    coarse_labels = lab[::FACTOR, ::FACTOR, ::FACTOR]
    masks = labels.masks_from_labels(coarse_labels, coarse_affine, LUT, (N, N, N),
                                     coarse_affine)
    assert masks.partial_volume is None
    assert "no label image finer than the maps" in masks.provenance["PartialVolume"]
    assert not any(k.endswith("_gtm") for k in motor_cortex_indices(masks, chi=chi).indices)


def test_a_finer_segmentation_beside_the_label_image_gives_the_fractions(tmp_path, shell):
    """The masks come from the label image found (here on the maps' grid); a finer
    ``*_dseg`` in the same folder gives the partial-volume fractions."""
    lab, fine_affine, coarse_affine, chi, masks_fine = shell
    anat = tmp_path / "derivatives" / "seg" / "sub-01" / "anat"
    table = "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LUT.items())
    coarse = np.where(masks_fine.precentral, 2, lab[::2, ::2, ::2]).astype(np.uint8)
    for stem, data, affine in (("sub-01_dseg", coarse, coarse_affine),
                               ("sub-01_res-fine_dseg", lab.astype(np.uint8), fine_affine)):
        save_nifti(anat / f"{stem}.nii.gz", data, affine)
        save_text(anat / f"{stem}.tsv", table)
    image, lut = labels.find_label_image(tmp_path, {"sub": "01"})
    assert image.name == "sub-01_dseg.nii.gz"
    assert labels.finer_label_image(image)[0].name == "sub-01_res-fine_dseg.nii.gz"
    assert labels.finer_label_image(anat / "sub-01_res-fine_dseg.nii.gz") is None
    masks = labels.masks_from_label_file(image, (N, N, N), coarse_affine, lut_path=lut)
    assert masks.provenance["PartialVolume"]["LabelImage"].endswith("res-fine_dseg.nii.gz")
    got = motor_cortex_indices(masks, chi=chi).indices
    assert got["chi_precentral_deep_gtm"] == pytest.approx(CHI["deep"], abs=1e-6)


def test_chain_transfer_undoes_a_chain_that_returns_a_fraction_of_the_band(shell):
    """A chain that returns 0.8 of χ (plus a smooth error): its measured transfer is 0.8
    and the corrected contrast is the truth's.  A chain that blurs: a change of the deep
    band comes back whole."""
    *_, chi, masks = shell
    regions = masks.partial_volume
    x, y, z = (np.indices(chi.shape) - N / 2) * COARSE_MM / 50.0
    smooth = (0.02 * y - 0.006 * z).astype(np.float32)
    truth = CHI["deep"] - CHI["wm"]

    def scaled(delta):
        return 0.8 * (chi + delta) + smooth

    found = motor_cortex_indices(masks, chi=scaled(0.0), chain_response=scaled)
    fit = found.parameters["PartialVolumeFits"]["chi"]["ChainTransfer"]
    assert fit["Transfer"] == pytest.approx(0.8, abs=1e-4) and "Rejected" not in fit
    assert found.indices["chi_precentral_deep_minusWM_gtmrc"] == pytest.approx(truth, abs=2e-5)
    assert found.indices[PARTIAL_VOLUME_INDEX] == pytest.approx(0.8 * truth, abs=2e-5)

    def blurred(delta):
        return ndimage.gaussian_filter((chi + delta).astype(np.float64), 0.6)

    # A blurring chain mixes the band with its neighbours: the correction is exact for a
    # change of the deep band (an ALS excess, its progression) but not for the level, into
    # which the other regions' contrasts leak (here 1.30 of the truth, measured 0.57).
    excess = 0.005 * pvc.region_fraction(regions, pvc.DEEP)
    before = motor_cortex_indices(masks, chi=blurred(0.0), chain_response=blurred).indices
    after = motor_cortex_indices(masks, chi=blurred(excess),
                                 chain_response=lambda delta: blurred(excess + delta)).indices
    index = "chi_precentral_deep_minusWM_gtmrc"
    gained = after[index] - before[index]
    # Within 2 %: raising the band moves a few voxels across the vein-trimming percentile.
    assert gained == pytest.approx(0.005, abs=1e-4)
    plain = after[PARTIAL_VOLUME_INDEX] - before[PARTIAL_VOLUME_INDEX]
    assert plain < 0.8 * 0.005, plain


def test_a_transfer_that_cannot_be_trusted_gives_no_index(shell):
    *_, chi, masks = shell
    found = motor_cortex_indices(masks, chi=chi, chain_response=lambda delta: chi + 0.0)
    fit = found.parameters["PartialVolumeFits"]["chi"]["ChainTransfer"]
    assert "Rejected" in fit and fit["Transfer"] == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(found.indices["chi_precentral_deep_minusWM_gtmrc"])
    # Without a chain to rerun there is no such index.
    assert "chi_precentral_deep_minusWM_gtmrc" not in motor_cortex_indices(masks, chi=chi).indices

"""`alsiron roi` and the indices at the end of `alsiron qsm`, on a small phantom dataset;
bad inputs end with one line and write nothing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from alsiron.cli import EXIT_INPUT_ERROR, main

STEM = "sub-02_ses-01"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roi") / "bids"
    assert main(["phantom", str(root), "--subjects", "2", "--matrix", "64", "--voxel-size",
                 "3", "--seed", "5"]) == 0
    return root


def _truth(root: Path, name: str) -> Path:
    return root / "derivatives/phantom/sub-02/ses-01/anat" / f"{STEM}_{name}"


def _with_truth_maps(root: Path, out: Path) -> Path:
    """A derivatives folder holding the phantom's true χ and R2* as if `qsm` made them."""
    anat = out / "sub-02/ses-01/anat"
    anat.mkdir(parents=True)
    for name in ("Chimap.nii.gz", "R2starmap.nii.gz"):
        shutil.copy(_truth(root, name), anat / f"{STEM}_{name}")
    return anat


def _read_tsv(path: Path) -> dict[str, float]:
    with path.open() as fh:
        return {r["index"]: float("nan") if r["value"] == "n/a" else float(r["value"])
                for r in csv.DictReader(fh, delimiter="\t")}


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


def test_roi_label_route_found_in_derivatives(dataset, tmp_path, capsys):
    out = tmp_path / "deriv"
    anat = _with_truth_maps(dataset, out)
    assert main(["roi", str(dataset / "sub-02"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "labels route" in printed and "chi precentral mean" in printed
    tsv = anat / f"{STEM}_desc-motorcortex_indices.tsv"
    indices = _read_tsv(tsv)
    data = json.loads(tsv.with_suffix(".json").read_text())
    assert data["QcStatus"] == "pass" and data["QcNotes"]["precentral_lost_to_mask"] == 0.0
    assert data["Parameters"]["Masks"]["Route"] == "labels"
    # The true χ map inside the true mask: the index equals the plain mean (±5 %).
    chi = np.asarray(nib.load(str(_truth(dataset, "Chimap.nii.gz"))).dataobj)
    labels = np.asarray(nib.load(str(_truth(dataset, "dseg.nii.gz"))).dataobj)
    ref = float(chi[np.isin(labels, [20, 21, 22, 23])].mean())
    assert abs(indices["chi_precentral_mean"] - ref) <= 0.05 * abs(ref)
    dseg = anat / f"{STEM}_desc-motorcortex_dseg.nii.gz"
    assert nib.load(str(dseg)).shape == chi.shape
    png = anat / f"{STEM}_desc-motorcortex_qc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run refuses to overwrite.
    assert main(["roi", str(dataset / "sub-02"), "--out", str(out)]) == EXIT_INPUT_ERROR
    assert "already exists" in capsys.readouterr().err


def test_labels_on_a_grid_without_overlap(dataset, tmp_path, capsys):
    out = tmp_path / "deriv"
    anat = _with_truth_maps(dataset, out)
    img = nib.load(str(_truth(dataset, "dseg.nii.gz")))
    far = img.affine.copy()
    far[:3, 3] += 500.0
    moved = tmp_path / "moved_dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), far), str(moved))
    before = _files(anat)
    code = main(["roi", str(dataset / "sub-02"), "--out", str(out), "--labels", str(moved),
                 "--lut", str(_truth(dataset, "dseg.tsv"))])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT_ERROR
    assert len(err.splitlines()) == 1 and "does not overlap" in err
    assert _files(anat) == before


def test_lut_without_precentral(dataset, tmp_path, capsys):
    out = tmp_path / "deriv"
    anat = _with_truth_maps(dataset, out)
    lut = tmp_path / "lut.tsv"
    lut.write_text("index\tname\n5\twhite_matter\n6\tcortical_gm\n")
    before = _files(anat)
    code = main(["roi", str(dataset / "sub-02"), "--out", str(out), "--labels",
                 str(_truth(dataset, "dseg.nii.gz")), "--lut", str(lut)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT_ERROR and "no precentral label" in err
    assert len(err.splitlines()) == 1
    assert _files(anat) == before


def test_roi_without_maps(dataset, tmp_path, capsys):
    code = main(["roi", str(dataset / "sub-02"), "--out", str(tmp_path / "empty")])
    assert code == EXIT_INPUT_ERROR
    assert "run `alsiron qsm` first" in capsys.readouterr().err


def test_qsm_computes_indices(dataset, tmp_path, capsys):
    out = tmp_path / "qsm"
    assert main(["qsm", str(dataset / "sub-02"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "motor-cortex indices" in printed
    anat = out / "sub-02/ses-01/anat"
    indices = _read_tsv(anat / f"{STEM}_desc-motorcortex_indices.tsv")
    notes = json.loads((anat / f"{STEM}_desc-motorcortex_indices.json").read_text())["QcNotes"]
    # The QSM mask keeps the convexity since the pre-BFR erosion is 4 mm (one voxel layer
    # here): measured 3.2 % of the precentral cortex lost, 0 % of its top quarter, QC
    # "pass" (the former 2-voxel erosion lost ≈ 49 % and QC said "warn").
    assert 0.0 <= notes["precentral_lost_to_mask"] < 0.08
    assert notes["precentral_top_lost_to_mask"] < 0.05
    # Precentral cortex above its underlying white matter (true contrast ≈ +45 ppb; the
    # PDF chain keeps roughly a third to a half of the cortical contrast, docs/qsm_bfr.md).
    assert indices["chi_precentral_minusWM_mean"] > 0.005
    # R2* fit in the precentral cortex within 10 % of the truth (17 s⁻¹ + ALS).
    truth_r2s = np.asarray(nib.load(str(_truth(dataset, "R2starmap.nii.gz"))).dataobj)
    labels = np.asarray(nib.load(str(_truth(dataset, "dseg.nii.gz"))).dataobj)
    ref = float(truth_r2s[np.isin(labels, [20, 21, 22, 23])].mean())
    assert abs(indices["r2star_precentral_mean"] - ref) < 0.1 * ref


def test_atlas_registration_failure_writes_nothing(dataset, tmp_path, capsys, monkeypatch):
    from alsiron.motor import registration

    root = tmp_path / "bids"
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns("derivatives"))
    out = tmp_path / "deriv"
    # Truth maps as the "qsm" outputs, and a magnitude of pure noise: nothing to register.
    anat_out = out / "sub-02/ses-01/anat"
    anat_out.mkdir(parents=True)
    shutil.copy(_truth(dataset, "Chimap.nii.gz"), anat_out / f"{STEM}_Chimap.nii.gz")
    shutil.copy(_truth(dataset, "desc-brain_mask.nii.gz"),
                anat_out / f"{STEM}_desc-brain_mask.nii.gz")
    mag = root / "sub-02/ses-01/anat" / f"{STEM}_echo-1_part-mag_MEGRE.nii.gz"
    img = nib.load(str(mag))
    noise = np.random.default_rng(0).uniform(0, 1, img.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, img.affine), str(mag))
    quick = registration.RegistrationParameters(affine_iters=(5,), syn_iters=(2,))
    monkeypatch.setattr(registration, "RegistrationParameters", lambda: quick)
    before = _files(out)
    code = main(["roi", str(root / "sub-02"), "--out", str(out), "--atlas", "ho"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INPUT_ERROR
    assert "did not converge" in err[-1] and str(mag) in err[-1]
    assert _files(out) == before

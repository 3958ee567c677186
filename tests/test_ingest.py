"""Ingestion: discovery, echo times, geometry, phase scaling, B0 direction, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from alsiron.errors import InputError
from alsiron.grid import voxel_size_from_affine
from alsiron.io import bids as ingest

from bids_factory import write_megre_session

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def load_first(path: Path, **kw):
    ses = ingest.find_sessions(path)[0]
    return ingest.load_megre(ses.series[0], subject=ses.subject, session=ses.session, **kw)


def test_subject_folder_with_sessions(tmp_path):
    write_megre_session(tmp_path, ses="01")
    write_megre_session(tmp_path, ses="02")
    sessions = ingest.find_sessions(tmp_path / "sub-01")
    assert [s.session for s in sessions] == ["01", "02"]
    series = load_first(tmp_path / "sub-01")
    assert series.magnitude.shape == (3, 12, 10, 8)
    assert series.magnitude.flags.c_contiguous and series.magnitude.dtype == np.float32
    np.testing.assert_allclose(series.echo_times, [0.004, 0.009, 0.014])
    assert series.field_strength == 3.0
    assert series.voxel_size == (2.0, 2.0, 2.5)
    assert series.b0_direction == pytest.approx((0.0, 0.0, 1.0))
    assert len(series.sources) == 6


def test_session_folder_and_subject_without_sessions(tmp_path):
    write_megre_session(tmp_path, ses="01")
    assert len(ingest.find_sessions(tmp_path / "sub-01" / "ses-01")) == 1
    write_megre_session(tmp_path, sub="02", ses=None)
    sessions = ingest.find_sessions(tmp_path / "sub-02")
    assert sessions[0].session == "" and sessions[0].series[0].prefix == "sub-02"
    assert ingest.dataset_root(tmp_path / "sub-02") == tmp_path.resolve()


def test_phase_is_radians_and_field_is_consistent(tmp_path):
    write_megre_session(tmp_path, field_ppm=0.05)
    s = load_first(tmp_path / "sub-01")
    assert s.phase.min() > -math.pi and s.phase.max() <= math.pi
    # The echo-difference phase recovers the simulated uniform field.
    d = np.angle(np.exp(1j * (s.phase[1] - s.phase[0])))
    field = d / (2 * np.pi * 42.577478e6 * 3.0 * (s.echo_times[1] - s.echo_times[0])) * 1e6
    np.testing.assert_allclose(field, 0.05, atol=1e-5)


def test_integer_coded_phase_is_rescaled(tmp_path):
    # Siemens style: -pi..pi stored as -4096..4094 (2 * code - 4096).
    def to_codes(p):
        return (np.round((p + np.pi) / (2 * np.pi) * 4096) * 2 - 4096).astype(np.float32)

    write_megre_session(tmp_path, phase_transform=to_codes)
    s = load_first(tmp_path / "sub-01")
    ref_dir = tmp_path / "ref"
    write_megre_session(ref_dir)
    r = load_first(ref_dir / "sub-01")
    err = np.angle(np.exp(1j * (s.phase - r.phase)))
    assert np.abs(err).max() < 2 * np.pi / 4096 * 1.01
    assert any("integer" in c for c in s.metadata["PhaseConversion"])


def test_siemens_fieldmap_phase_codes_from_real_data():
    path = REAL / "dcm_qa_fmap_siemens" / "Si_4_gre_field_ph_e2_ph.nii"
    if not path.exists():
        pytest.skip("shared real data not present")
    img = nib.load(str(path))
    phase, how = ingest.phase_to_radians(img.get_fdata(dtype=np.float32), None, path)
    assert -math.pi < phase.min() and phase.max() <= math.pi
    assert phase.max() - phase.min() > 6.0  # full circle used
    assert "integer" in how


def test_radians_hidden_behind_scl_slope_from_real_data():
    # romeo_small stores radians but carries scl_slope = 1/855.
    path = REAL / "romeo_small" / "Phase.nii"
    if not path.exists():
        pytest.skip("shared real data not present")
    img = nib.load(str(path))
    scaled = img.get_fdata(dtype=np.float32)
    raw = np.asarray(img.dataobj.get_unscaled(), dtype=np.float32)
    phase, how = ingest.phase_to_radians(scaled, raw, path)
    assert phase.max() - phase.min() > 6.0
    assert "ignored" in how


def test_phase_out_of_any_known_range_is_refused(tmp_path):
    values = np.linspace(-4.7, 4.7, 1000, dtype=np.float32)  # like phase_with_nan.nii
    with pytest.raises(InputError, match=r"phase values span \[-4\.7, 4\.7\]"):
        ingest.phase_to_radians(values, None, tmp_path / "p.nii")


def test_b0_direction_from_oblique_affine():
    angle = math.radians(20)
    rot_x = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)],
                      [0, math.sin(angle), math.cos(angle)]])
    aff = np.eye(4)
    aff[:3, :3] = rot_x @ np.diag([1.0, 1.5, 2.0])
    b = ingest.b0_direction_from_affine(aff)
    # Voxel axis j points partly along world z: b_j = sin(20°), b_k = cos(20°).
    assert b == pytest.approx((0.0, math.sin(angle), math.cos(angle)), abs=1e-12)
    assert voxel_size_from_affine(aff) == pytest.approx((1.0, 1.5, 2.0))
    # A left-right flip (negative x axis) does not change the B0 components.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    assert ingest.b0_direction_from_affine(flip) == pytest.approx((0.0, 0.0, 1.0))


def test_echo_time_override(tmp_path):
    anat = write_megre_session(tmp_path)
    for side in anat.glob("*.json"):
        d = json.loads(side.read_text())
        del d["EchoTime"]
        side.write_text(json.dumps(d))
    with pytest.raises(InputError, match="no EchoTime.*--echo-times"):
        load_first(tmp_path / "sub-01")
    s = load_first(tmp_path / "sub-01", echo_times=[0.005, 0.01, 0.015])
    np.testing.assert_allclose(s.echo_times, [0.005, 0.01, 0.015])
    with pytest.raises(InputError, match="3 echoes"):
        load_first(tmp_path / "sub-01", echo_times=[0.005, 0.01])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("single_echo", "only one echo"),
        ("shape", r"shape \(12, 10, 9\) differs"),
        ("affine", "affine differs"),
        ("nan", "non-finite"),
        ("ms", "looks like milliseconds"),
        ("decreasing", "not strictly increasing"),
        ("no_field", "MagneticFieldStrength"),
        ("field_freq", "disagrees with ImagingFrequency"),
        ("missing_phase", "no matching part-phase"),
        ("negative_mag", "negative values"),
        ("bad_json", "cannot read JSON sidecar"),
    ],
)
def test_bad_input_is_refused_naming_the_file(tmp_path, mutate, message):
    tes = (0.004, 0.009, 0.014)
    extra: dict = {}
    if mutate == "single_echo":
        tes = (0.004,)
    if mutate == "field_freq":
        extra = {"ImagingFrequency": 63.87}  # 1.5 T centre frequency with "3 T" label
    anat = write_megre_session(tmp_path, echo_times=tes, sidecar_extra=extra)
    e2 = anat / "sub-01_ses-01_echo-2_part-mag_MEGRE.nii.gz"
    if mutate == "shape":
        nib.save(nib.Nifti1Image(np.ones((12, 10, 9), np.float32), np.diag([2, 2, 2.5, 1.0])), e2)
    elif mutate == "affine":
        nib.save(nib.Nifti1Image(np.ones((12, 10, 8), np.float32), np.diag([2, 2, 3.0, 1.0])), e2)
    elif mutate == "nan":
        d = np.ones((12, 10, 8), np.float32)
        d[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(d, np.diag([2, 2, 2.5, 1.0])), e2)
    elif mutate == "negative_mag":
        nib.save(nib.Nifti1Image(-np.ones((12, 10, 8), np.float32), np.diag([2, 2, 2.5, 1.0])), e2)
    elif mutate in ("ms", "decreasing", "no_field", "bad_json"):
        for side in anat.glob("*echo-2*.json"):
            d = json.loads(side.read_text())
            if mutate == "ms":
                d["EchoTime"] = 9.0
            elif mutate == "decreasing":
                d["EchoTime"] = 0.002
            elif mutate == "no_field":
                d.pop("MagneticFieldStrength")
            side.write_text(json.dumps(d) if mutate != "bad_json" else "{not json")
        if mutate == "no_field":
            for side in anat.glob("*echo-1*.json"):
                d = json.loads(side.read_text())
                d.pop("MagneticFieldStrength")
                side.write_text(json.dumps(d))
    elif mutate == "missing_phase":
        (anat / "sub-01_ses-01_echo-3_part-phase_MEGRE.nii.gz").unlink()
    with pytest.raises(InputError, match=message) as info:
        load_first(tmp_path / "sub-01")
    assert info.value.path is not None and "sub-01" in info.value.path
    assert "\n" not in str(info.value)


def test_nonfinite_voxels_can_be_zeroed(tmp_path):
    anat = write_megre_session(tmp_path)
    e2 = anat / "sub-01_ses-01_echo-2_part-phase_MEGRE.nii.gz"
    d = np.zeros((12, 10, 8), np.float32)
    d[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(d, np.diag([2, 2, 2.5, 1.0])), e2)
    s = load_first(tmp_path / "sub-01", fill_nonfinite=True)
    assert s.metadata["NonFiniteVoxels"] == 1
    assert s.magnitude[:, 1, 2, 3].tolist() == [0.0, 0.0, 0.0]
    assert np.isfinite(s.phase).all()


def test_not_a_bids_folder(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        ingest.find_sessions(tmp_path / "missing")
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="not a BIDS subject"):
        ingest.find_sessions(tmp_path / "data")
    (tmp_path / "sub-09" / "anat").mkdir(parents=True)
    with pytest.raises(InputError, match="no \\*_MEGRE"):
        ingest.find_sessions(tmp_path / "sub-09")

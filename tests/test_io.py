"""Atomic outputs: an interrupted write leaves nothing; finished outputs are protected."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from alsiron.errors import OutputExistsError
from alsiron.io import atomic as io


def test_roundtrip_with_sidecar(tmp_path):
    data = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    p = io.save_nifti(tmp_path / "a" / "x_Chimap.nii.gz", data, aff, sidecar={"Units": "ppm"})
    img = nib.load(str(p))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), data.astype(np.float32))
    np.testing.assert_array_equal(img.affine, aff)
    assert (tmp_path / "a" / "x_Chimap.json").read_text().count('"ppm"') == 1


def test_interrupted_write_leaves_no_partial_output(tmp_path, monkeypatch):
    target = tmp_path / "x_Chimap.nii.gz"

    def exploding_save(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"half a nifti")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_nifti(target, np.zeros((2, 2, 2)), np.eye(4), sidecar={"Units": "ppm"})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_finished_file(tmp_path, monkeypatch):
    target = tmp_path / "x_Chimap.nii.gz"
    io.save_nifti(target, np.ones((2, 2, 2)), np.eye(4))
    before = target.read_bytes()

    def failing_save(img, filename):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError):
        io.save_nifti(target, np.zeros((2, 2, 2)), np.eye(4), overwrite=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_Chimap.nii.gz"]


def test_existing_output_is_not_overwritten_unless_asked(tmp_path):
    target = tmp_path / "x.json"
    io.save_json(target, {"a": 1})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        io.save_json(target, {"a": 2})
    io.save_json(target, {"a": 2}, overwrite=True)
    assert '"a": 2' in target.read_text()


def test_finished_outputs_get_the_umask_mode_not_mkstemp_0600(tmp_path):
    import os

    from alsiron.io.atomic import save_text

    old = os.umask(0o022)
    try:
        path = save_text(tmp_path / "table.tsv", "a\tb\n")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644

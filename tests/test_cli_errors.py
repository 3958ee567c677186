"""The command line turns bad input into one line naming the file, with a non-zero exit."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from alsiron.cli import EXIT_INPUT_ERROR, main

from bids_factory import write_megre_session


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def input_error(capsys, *args: str) -> str:
    """stderr of a command that must exit with the input-error code."""
    code, _, err = run(capsys, *args)
    assert code == EXIT_INPUT_ERROR
    return err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("alsiron: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "qsm" in out and "phantom" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "alsiron" in out


def test_missing_folder(capsys, tmp_path):
    err = input_error(capsys, "qsm", str(tmp_path / "sub-404"))
    assert_one_line_error(err, "sub-404", "not a folder")


def test_single_echo(capsys, tmp_path):
    write_megre_session(tmp_path, echo_times=(0.005,))
    err = input_error(capsys, "qsm", str(tmp_path / "sub-01"))
    assert_one_line_error(err, "echo-1_part-mag_MEGRE.nii.gz", "only one echo")


def test_nan_voxels(capsys, tmp_path):
    anat = write_megre_session(tmp_path)
    path = anat / "sub-01_ses-01_echo-3_part-mag_MEGRE.nii.gz"
    d = np.ones((12, 10, 8), np.float32)
    d[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(d, np.diag([2, 2, 2.5, 1.0])), path)
    err = input_error(capsys, "qsm", str(tmp_path / "sub-01"))
    assert_one_line_error(err, "echo-3_part-mag", "1 non-finite", "--fill-nonfinite")


def test_missing_echo_time(capsys, tmp_path):
    anat = write_megre_session(tmp_path)
    for side in anat.glob("*echo-2*.json"):
        d = json.loads(side.read_text())
        d.pop("EchoTime")
        side.write_text(json.dumps(d))
    err = input_error(capsys, "qsm", str(tmp_path / "sub-01"))
    assert_one_line_error(err, "echo-2_part-mag", "--echo-times")


def test_mismatched_shapes(capsys, tmp_path):
    anat = write_megre_session(tmp_path)
    path = anat / "sub-01_ses-01_echo-2_part-phase_MEGRE.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 7), np.float32), np.diag([2, 2, 2.5, 1.0])), path)
    err = input_error(capsys, "qsm", str(tmp_path / "sub-01"))
    assert_one_line_error(err, "echo-2_part-phase", "differs")


@pytest.mark.parametrize("bad", [["--threads", "0"], ["qsm", "--inversion", "magic", "x"]])
def test_bad_options_are_usage_errors(capsys, bad):
    code, _, err = run(capsys, *bad)
    assert code != 0 and "Traceback" not in err


def test_invalid_option_value_is_one_line(capsys, tmp_path):
    err = input_error(capsys, "phantom", str(tmp_path / "ph"), "--voxel-size", "-1")
    assert_one_line_error(err, "voxel_size", "positive")


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback(monkeypatch, tmp_path):
    from alsiron.runs import qsm as pipeline

    def buggy(*_args, **_kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(pipeline, "run_qsm_subject", buggy)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["qsm", str(tmp_path / "sub-01")])

"""Issue 14, finding 3: a visit's outputs are one transaction.

A real ``alsiron qsm`` child process is interrupted at each stage (load, field fit,
inversion, writing, indices, publishing, registry, and just after the record is stored)
with SIGINT, SIGTERM and SIGKILL; the stage is hit exactly through the test-only
``$ALSIRON_TEST_INTERRUPT`` (``alsiron.io.transaction.interrupt_point``).  After each
interrupt the visit's folder holds the old complete set (or, for a fresh visit,
nothing) or the new complete set, never a mix, and the registry's current record names
exactly the files on disk; the rerun without ``--overwrite`` either succeeds or refuses
with "already exists", and leaves no staging folder behind.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from visit_sets import anat as _anat
from visit_sets import check_complete_set, run_alsiron
from visit_sets import hidden as _hidden
from visit_sets import visible as _visible

from alsiron.cli import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, main
from alsiron.cohort.registry import Registry
from alsiron.io import transaction
from alsiron.io.transaction import STAGING_PREFIX
from alsiron.qsm.chain import QsmParameters

#: The chain's default inversion (what a run without --inversion records).
DEFAULT = QsmParameters().inversion.method

STAGES = ["load", "field fit", "inversion", "writing", "indices", "publish", "registry",
          "committed"]
#: A SIGKILL at these stages leaves a half-published folder until the next run into it.
KILLED_WHILE_PUBLISHING = ("publish", "registry", "committed")
EXIT = {"SIGINT": EXIT_INTERRUPTED, "SIGTERM": EXIT_TERMINATED, "SIGKILL": -signal.SIGKILL}
@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    assert main(["phantom", str(root), "--subjects", "1", "--matrix", "32",
                 "--voxel-size", "4"]) == 0
    return root


def _dataset(phantom: Path, where: Path) -> Path:
    shutil.copytree(phantom, where)
    return where


def _child(subject: Path, *args: str, stage: str | None = None, sig: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    return run_alsiron(["qsm", str(subject), *args],
                       interrupt=None if stage is None else f"{stage}:{sig}")


def _rerun_without_overwrite(root: Path, capsys) -> int:
    """The rerun of an interrupted visit: it succeeds, or refuses with 'already exists';
    either way no staging folder or temporary is left."""
    capsys.readouterr()
    status = main(["qsm", str(root / "sub-01")])
    err = capsys.readouterr().err
    assert status in (0, EXIT_INPUT_ERROR), err
    if status != 0:
        assert "already exists (use --overwrite" in err and "Traceback" not in err, err
    assert _hidden(root) == []
    return status


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_overwrite_keeps_the_old_set_or_the_new_set(phantom, tmp_path, capsys,
                                                                 sig):
    root = _dataset(phantom, tmp_path / "ds")
    assert main(["qsm", str(root / "sub-01"), "--inversion", "tkd"]) == 0
    before, method = check_complete_set(root, {"tkd"})
    for stage in STAGES:
        proc = _child(root / "sub-01", "--overwrite", "--inversion", "tikhonov",
                      stage=stage, sig=sig)
        assert proc.returncode == EXIT[sig], (stage, proc.stderr)
        assert "Traceback" not in proc.stderr
        # Only an interrupt after the record was stored leaves the new set.
        expected = ("tikhonov" if stage == "committed" else method)
        if sig != "SIGKILL":  # handled: rolled back (or forward) before exiting
            assert _hidden(root) == [], stage
            assert check_complete_set(root, {method, "tikhonov"})[1] == expected, stage
        elif stage not in KILLED_WHILE_PUBLISHING:
            assert _visible(_anat(root)) == before, stage  # not touched yet
        _rerun_without_overwrite(root, capsys)  # resolves what a SIGKILL left
        files, inversion = check_complete_set(root, {method, "tikhonov"})
        assert inversion == expected, stage
        assert files == before or stage == "committed", stage
        before, method = files, inversion


def test_interrupted_fresh_visit_leaves_nothing_or_everything(phantom, tmp_path, capsys):
    signals = ["SIGKILL", "SIGINT", "SIGTERM"]
    for i, stage in enumerate(STAGES):
        root = _dataset(phantom, tmp_path / f"ds{i}")
        sig = signals[i % 3]
        proc = _child(root / "sub-01", stage=stage, sig=sig)
        assert proc.returncode == EXIT[sig], (stage, proc.stderr)
        if sig == "SIGKILL" and stage in KILLED_WHILE_PUBLISHING:
            files = {"resolved": "by the rerun"} if stage == "committed" else {}
        else:
            files, _ = check_complete_set(root, {DEFAULT})
            assert bool(files) == (stage == "committed"), stage
        if sig != "SIGKILL" and stage != "committed":
            # Nothing was published: not even the empty folders stay.
            assert not (root / "derivatives" / "alsiron" / "sub-01").exists(), stage
        status = _rerun_without_overwrite(root, capsys)
        assert status == (EXIT_INPUT_ERROR if files else 0), stage
        assert check_complete_set(root, {DEFAULT})[0], stage


def test_overwrite_no_indices_removes_the_old_indices(phantom, tmp_path):
    """Finding 3: ``--overwrite --no-indices`` left the previous run's indices beside a
    new χ; the new set replaces the whole old set."""
    root = _dataset(phantom, tmp_path / "ds")
    assert main(["qsm", str(root / "sub-01"), "--no-registry", "--inversion", "tkd"]) == 0
    assert any("motorcortex" in n for n in _visible(_anat(root)))
    assert main(["qsm", str(root / "sub-01"), "--no-registry", "--overwrite",
                 "--no-indices"]) == 0
    files = _visible(_anat(root))
    assert files and not any("motorcortex" in n for n in files)
    for name in files:
        if name.endswith(".json"):
            side = json.loads((_anat(root) / name).read_text())
            assert side["Parameters"]["inversion"] == DEFAULT, name


def _participants(root: Path, **values: str) -> None:
    path = root / "participants.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    header = rows[0]
    for key, value in values.items():
        if key not in header:
            header.append(key)
            for row in rows[1:]:
                row.append("n/a")
        for row in rows[1:]:
            if row[0] == "sub-01":
                row[header.index(key)] = value
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


@pytest.mark.parametrize("values, needle", [
    ({"age": "sixty"}, "participants.tsv"),
    ({"sex": "F" * 40}, "holds at most 16"),
])
def test_bad_visit_metadata_is_refused_before_computing(phantom, tmp_path, capsys,
                                                        monkeypatch, values, needle):
    """Finding 3: a bad ``participants.tsv`` value (or one too long for the registry's
    column, which PostgreSQL enforces and SQLite does not) was found after the maps were
    written, leaving maps without a record; now the visit is refused before loading."""
    root = _dataset(phantom, tmp_path / "ds")
    _participants(root, **values)
    from alsiron.runs import qsm as run_qsm

    def no_load(*_a, **_k):
        raise AssertionError("loaded the images of a refused visit")

    monkeypatch.setattr(run_qsm.ingest, "load_megre", no_load)
    assert main(["qsm", str(root / "sub-01")]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert _visible(_anat(root)) == {} and _hidden(root) == []


def test_registry_failure_while_recording_keeps_the_old_set(phantom, tmp_path, capsys,
                                                            monkeypatch):
    """Finding 3: a registry that fails when the record is stored (server stopped, disk
    full) left maps without a record; now the old set and the old record stay."""
    root = _dataset(phantom, tmp_path / "ds")
    assert main(["qsm", str(root / "sub-01"), "--inversion", "tkd"]) == 0
    before = check_complete_set(root, {"tkd"})

    def stopped(self, record):
        from alsiron.errors import RegistryError
        raise RegistryError(None, "server closed the connection unexpectedly")

    monkeypatch.setattr(Registry, "record_session", stopped)
    assert main(["qsm", str(root / "sub-01"), "--overwrite"]) == EXIT_INPUT_ERROR
    assert "server closed" in capsys.readouterr().err
    monkeypatch.undo()
    assert check_complete_set(root, {"tkd"}) == before
    assert _hidden(root) == []


def test_too_little_disk_space_is_refused_before_computing(phantom, tmp_path, capsys,
                                                           monkeypatch):
    root = _dataset(phantom, tmp_path / "ds")
    monkeypatch.setattr(transaction, "free_bytes", lambda _folder: 10 << 20)
    from alsiron.qsm import chain

    def no_compute(*_a, **_k):
        raise AssertionError("computed a refused visit")

    monkeypatch.setattr(chain, "process_series", no_compute)
    assert main(["qsm", str(root / "sub-01")]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err.strip()
    assert "not enough free disk space" in err and "MiB free" in err, err
    assert str(_anat(root)) in err and len(err.splitlines()) == 2  # "loading", then it
    assert not (root / "derivatives" / "alsiron" / "sub-01").exists()


def test_staging_folder_of_a_killed_run_is_cleaned_by_the_next_run(phantom, tmp_path):
    root = _dataset(phantom, tmp_path / "ds")
    proc = _child(root / "sub-01", "--no-registry", stage="writing", sig="SIGKILL")
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in _anat(root).iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert len(left) == 1 and any(left[0].iterdir())
    assert main(["qsm", str(root / "sub-01"), "--no-registry"]) == 0
    assert _hidden(root) == []
    assert _visible(_anat(root))

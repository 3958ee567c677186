"""Issue 14, finding 3: parallel writers, on SQLite and on PostgreSQL.

Six visits processed at once by six ``alsiron qsm`` processes into one registry, and two
``--overwrite`` runs of one visit with different inversions started together: every
visit's folder holds one complete set whose maps and sidecars name the method its
current registry record names, file by file (SHA-256).  The PostgreSQL variant starts a
local server (skipped where ``initdb``/``pg_ctl`` or ``psycopg`` are missing; ``.ci/run``
installs them best effort).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from postgres_server import new_database_url, postgres_server
from visit_sets import check_complete_set, hidden, popen_alsiron

from alsiron.cli import main
from alsiron.cohort.registry import Registry
from alsiron.qsm.chain import QsmParameters

#: The chain's default inversion (what a run without --inversion records).
DEFAULT = QsmParameters().inversion.method

PORT = 55400 + os.getpid() % 400


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom6")
    assert main(["phantom", str(root), "--subjects", "6", "--matrix", "32",
                 "--voxel-size", "4"]) == 0
    return root


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server(PORT) as root:
        yield root


def _postgres_url(server: Path) -> str:
    return new_database_url(server, PORT)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request, tmp_path) -> str:
    """A registry location: an SQLite file, or a fresh database on the local server."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite")
    return _postgres_url(request.getfixturevalue("pg_server"))


def _all_finish(procs) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "Traceback" not in err


def test_six_visits_at_once_into_one_registry(phantom, tmp_path, registry):
    root = tmp_path / "ds"
    shutil.copytree(phantom, root)
    subjects = [f"sub-0{i}" for i in range(1, 7)]
    _all_finish([popen_alsiron(["qsm", str(root / s), "--registry", registry])
                 for s in subjects])
    for subject in subjects:
        files, inversion = check_complete_set(root, {DEFAULT}, subject=subject,
                                              registry=registry)
        assert files and inversion == DEFAULT
    with Registry.open(registry, create=False) as reg:
        assert sorted(r.subject for r in reg.sessions()) == subjects
    assert hidden(root) == []


def test_two_overwrite_runs_of_one_visit_at_once(phantom, tmp_path, registry):
    root = tmp_path / "ds"
    shutil.copytree(phantom, root, ignore=shutil.ignore_patterns("sub-0[2-6]"))
    subject = str(root / "sub-01")
    assert main(["qsm", subject, "--registry", registry, "--inversion", "tkd"]) == 0
    _all_finish([popen_alsiron(["qsm", subject, "--registry", registry, "--overwrite",
                                "--inversion", method]) for method in ("tikhonov", "tkd")])
    files, inversion = check_complete_set(root, {"tikhonov", "tkd"}, registry=registry)
    assert files
    with Registry.open(registry, create=False) as reg:
        history = reg.history("sub-01", "ses-01")
    assert len(history) == 3
    # The last record stored is the one in force, and it names the files on disk.
    assert history[-1].parameters["outputs"]["files"] == files
    assert hidden(root) == []

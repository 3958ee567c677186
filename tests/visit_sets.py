"""Checks shared by the reliability tests of issue 14, finding 3: a visit's folder holds
one complete output set that its registry record names, and a child ``alsiron``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from alsiron.cohort.registry import Registry
from alsiron.io.transaction import INTERRUPT_ENV, STAGING_PREFIX

# Python ignores SIGINT in a child started with SIGINT ignored (a background job):
# restore Ctrl-C's handler so the tests do not depend on how pytest was started.
_ALSIRON = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from alsiron.cli import entry_point; sys.argv[0] = 'alsiron'; entry_point()")


def anat(root: Path, subject: str = "sub-01") -> Path:
    """The visit's output folder in the default derivatives of dataset ``root``."""
    return root / "derivatives" / "alsiron" / subject / "ses-01" / "anat"


def visible(folder: Path) -> dict[str, str]:
    """File name → SHA-256 of the outputs in ``folder`` (hidden staging files left out)."""
    if not folder.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def hidden(root: Path) -> list[Path]:
    """Staging folders and temporary files left anywhere under ``root``."""
    return [p for p in root.rglob(".*")
            if p.name.startswith(STAGING_PREFIX) or ".part" in p.name]


def popen_alsiron(args: list[str], *, interrupt: str | None = None) -> subprocess.Popen[str]:
    """Start ``alsiron ARGS`` as a child process (``interrupt``: ``STAGE:SIGNAL`` for
    ``$ALSIRON_TEST_INTERRUPT``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.pop(INTERRUPT_ENV, None)
    if interrupt is not None:
        env[INTERRUPT_ENV] = interrupt
    return subprocess.Popen([sys.executable, "-c", _ALSIRON, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def run_alsiron(args: list[str], *, interrupt: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Run ``alsiron ARGS`` as a child process to its end."""
    proc = popen_alsiron(args, interrupt=interrupt)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_complete_set(root: Path, inversions: set[str], *, subject: str = "sub-01",
                       registry: str | Path | None = None) -> tuple[dict[str, str], str | None]:
    """The visit's folder holds nothing, or one complete set that the registry's current
    record names file by file (same names, same SHA-256), whose map sidecars all name the
    record's inversion, one of ``inversions``.  Returns (files, inversion).

    ``registry``: the registry location (default: the dataset's SQLite file)."""
    files = visible(anat(root, subject))
    location = registry or root / "derivatives" / "alsiron" / "registry.sqlite"
    records = []
    if not isinstance(location, Path) or location.exists():
        with Registry.open(location, create=False) as reg:
            records = reg.sessions(subject)
    if not files:
        assert records == [], "a record without its outputs"
        return files, None
    assert len(records) == 1, f"{len(files)} files but {len(records)} current records"
    record = records[0]
    assert record.parameters["outputs"]["files"] == files, "record and files disagree"
    inversion = record.parameters["qsm"]["Parameters"]["inversion"]
    assert inversion in inversions
    for name in files:
        if name.endswith(".json") and "motorcortex" not in name:
            side = json.loads((anat(root, subject) / name).read_text())
            assert side["Parameters"]["inversion"] == inversion, name
    assert any(n.endswith("_Chimap.nii.gz") for n in files)
    assert any(n.endswith("_desc-motorcortex_indices.tsv") for n in files)
    return files, inversion

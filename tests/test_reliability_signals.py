"""Issue 14, findings 3 (SIGTERM, leftover temporary files) and 7 (Ctrl-C during a lock wait).

Each test runs a real process and signals it; each failed on main e4c9203.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib

from alsiron.cli import EXIT_TERMINATED, main
from alsiron.cohort.registry import Registry

_ALSIRON = "import sys; from alsiron.cli import entry_point; sys.argv[0] = 'alsiron'; entry_point()"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _phantom(root: Path) -> Path:
    assert main(["phantom", str(root), "--subjects", "1", "--matrix", "32",
                 "--voxel-size", "4"]) == 0
    return root / "sub-01"


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".part" in p.name]


def test_sigterm_mid_run_removes_temporaries_and_exits_143(tmp_path):
    subject = _phantom(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _ALSIRON, "-v", "qsm", str(subject),
                             "--no-registry"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[1/5]" in line:  # computing the brain mask: well before any map is written
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, (lines, out)
    assert "alsiron: terminated" in out
    assert "Traceback" not in out
    assert _temporaries(tmp_path) == []
    for image in (tmp_path / "derivatives").rglob("*.nii*"):
        nib.load(image).get_fdata()  # nothing under a final name is half-written


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    subject = _phantom(tmp_path)
    anat = tmp_path / "derivatives" / "alsiron" / "sub-01" / "ses-01" / "anat"
    anat.mkdir(parents=True)
    # What SIGKILL leaves: mkstemp's name for the χ map, zero bytes, from an earlier process.
    stale = anat / ".sub-01_ses-01_Chimap.nii.gz.k3j_9x0a.part.nii.gz"
    unrelated = anat / ".notes.part"
    for path in (stale, unrelated):
        path.write_bytes(b"")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert main(["qsm", str(subject), "--no-registry"]) == 0
    assert not stale.exists()
    assert unrelated.exists()
    assert _temporaries(tmp_path) == [unrelated]


_WRITER = """
    import sys
    from alsiron.cohort.records import SessionRecord
    from alsiron.cohort.registry import Registry
    reg = Registry.open(sys.argv[1])
    print("writing", flush=True)
    try:
        reg.record_session(SessionRecord(subject="sub-01", session="ses-01"))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    print("stored", flush=True)
"""


def test_ctrl_c_during_a_lock_wait_lands_at_once(tmp_path):
    path = tmp_path / "r.sqlite"
    Registry.open(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_WRITER), str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.5)  # inside the lock wait
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the writer did not see Ctrl-C within 5 s") from None
        elapsed = time.monotonic() - sent
    finally:
        holder.rollback()
        holder.close()
    assert "interrupted" in out, err
    assert elapsed < 2.0


def test_sigterm_while_writing_maps_leaves_no_temporary_or_half_written_map(tmp_path):
    subject = _phantom(tmp_path)
    anat = tmp_path / "derivatives" / "alsiron" / "sub-01" / "ses-01" / "anat"
    proc = subprocess.Popen([sys.executable, "-c", _ALSIRON, "qsm", str(subject),
                             "--no-registry"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    while proc.poll() is None and not (anat.is_dir() and any(anat.iterdir())):
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)  # the first output file exists: writing has begun
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, out
    assert "Traceback" not in out
    assert _temporaries(tmp_path) == []
    for image in anat.glob("*.nii*"):
        nib.load(image).get_fdata()

"""Fingerprint every output of the ``alsiron`` command line on small phantoms, and compare
two fingerprints: the proof that a refactor changed no output.

``run``: runs a fixed set of commands (``phantom``, ``qsm`` with default and other
methods, ``relax``, ``roi``, ``registry export``, ``normative build``, ``longitudinal``,
``report``, ``power``, ``demo``) with the ``alsiron`` found on ``PATH`` into a work
folder, then writes a JSON manifest: for every NIfTI the SHA-256 of its voxel array,
its dtype, shape and header geometry; for every JSON sidecar its content; for every TSV
its text; for every PNG its bytes; and each command's exit code and standard output.

Values that legitimately change between two runs of the *same* code are removed before
hashing, and nothing else: wall-clock times and dates, the software version, absolute
paths of the work folder, and the HTML pages' write time. ``compare`` prints every
difference and exits 1 if there is one.

    python tools/output_manifest.py run WORK_DIR MANIFEST.json
    python tools/output_manifest.py compare OLD.json NEW.json
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

#: (name, argv after ``alsiron``); ``{W}`` is the work folder.
COMMANDS: list[tuple[str, list[str]]] = [
    ("phantom", ["phantom", "{W}/bids", "--subjects", "2", "--sessions", "2", "--matrix", "64",
                 "--voxel-size", "3", "--seed", "3", "--mese"]),
    ("phantom_oblique", ["phantom", "{W}/obl", "--subjects", "1", "--matrix", "48",
                         "--voxel-size", "4", "--b0-direction", "0.2", "0.1", "1", "--snr",
                         "40", "--seed", "5"]),
    ("qsm_default", ["qsm", "{W}/bids/sub-01"]),
    ("qsm_default_sub02", ["qsm", "{W}/bids/sub-02"]),
    ("qsm_list", ["qsm", "--list-methods"]),
    ("qsm_tkd_vsharp", ["qsm", "{W}/bids/sub-02/ses-01", "--out", "{W}/alt_tkd",
                        "--inversion", "tkd", "--bfr", "vsharp", "--brain-mask", "otsu",
                        "--no-registry", "--no-indices"]),
    ("qsm_medi_lbv", ["qsm", "{W}/bids/sub-01/ses-02", "--out", "{W}/alt_medi",
                      "--inversion", "medi", "--bfr", "lbv", "--unwrapping", "laplacian",
                      "--mask-erode", "2vox", "--no-registry", "--no-indices"]),
    ("qsm_ilsqr_ismv", ["qsm", "{W}/bids/sub-01/ses-01", "--out", "{W}/alt_ilsqr",
                        "--inversion", "ilsqr", "--bfr", "ismv", "--unwrapping", "echodiff",
                        "--no-registry", "--no-indices"]),
    ("qsm_weak_harmonic", ["qsm", "{W}/bids/sub-02/ses-02", "--out", "{W}/alt_wh",
                           "--weak-harmonic", "--no-registry", "--no-indices"]),
    ("qsm_rts_ndi", ["qsm", "{W}/obl/sub-01", "--out", "{W}/alt_rts", "--inversion", "rts",
                     "--no-registry", "--no-indices"]),
    ("qsm_ndi", ["qsm", "{W}/obl/sub-01", "--out", "{W}/alt_ndi", "--inversion", "ndi",
                 "--bfr", "vsharp", "--no-registry", "--no-indices"]),
    ("qsm_tikhonov", ["qsm", "{W}/obl/sub-01", "--out", "{W}/alt_tik", "--inversion",
                      "tikhonov", "--no-registry", "--no-indices"]),
    ("qsm_exists", ["qsm", "{W}/bids/sub-01"]),
    ("qsm_bad_dir", ["qsm", "{W}/nonexistent"]),
    ("relax", ["relax", "{W}/bids/sub-01"]),
    ("relax_nlls", ["relax", "{W}/bids/sub-02/ses-01", "--out", "{W}/alt_relax",
                    "--r2star-method", "nlls", "--no-b0-gradient-correction"]),
    ("roi_atlas", ["roi", "{W}/bids/sub-02/ses-02", "--atlas", "ho", "--overwrite"]),
    ("roi_overwrite", ["roi", "{W}/bids/sub-01/ses-01", "--overwrite"]),
    ("registry_export", ["registry", "export", "{W}/registry.tsv", "--registry",
                         "{W}/bids/derivatives/alsiron/registry.sqlite"]),
    ("normative", ["normative", "build", "--out", "{W}/model.json", "--dataset", "{W}/bids",
                   "--visits", "all"]),
    ("longitudinal", ["longitudinal", "{W}/bids/sub-01"]),
    ("report", ["report", "{W}/bids/sub-01", "--out", "{W}/report_sub01.html"]),
    ("demo", ["demo", "{W}/demo", "--subjects", "4", "--sessions", "2"]),
    ("longitudinal_cohort", ["longitudinal", "--cohort", "--registry",
                             "{W}/demo/derivatives/alsiron/registry.sqlite"]),
    ("power", ["power", "--slowing", "0.3", "--registry",
               "{W}/demo/derivatives/alsiron/registry.sqlite"]),
    ("report_cohort", ["report", "--cohort", "--registry",
                       "{W}/demo/derivatives/alsiron/registry.sqlite", "--out",
                       "{W}/report_cohort.html"]),
]

_VOLATILE_KEYS = {"software_version", "SoftwareVersion", "Version", "created", "created_at",
                  "recorded_at", "applied_at", "processed_at", "ElapsedSeconds", "elapsed_s",
                  "written_at", "Date", "date"}
_TIMING = re.compile(r"\b\d+(\.\d+)?\s?(s|ms|min)\b")
_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?")
#: A registry record's ``parameters.outputs`` (random transaction id, checksums of
#: sidecars that hold timings), in compact JSON or in the report's escaped, indented JSON.
_OUTPUTS = re.compile(r'(&quot;|")outputs\1: \{.*?\1transaction\1: \1[0-9a-f]{32}\1\s*\}',
                      re.S)


def _scrub_text(text: str, work: Path) -> str:
    text = text.replace(str(work), "{W}")
    text = _OUTPUTS.sub(r"\1outputs\1: {VOLATILE}", text)
    text = _ISO_TIME.sub("{TIME}", text)
    text = _TIMING.sub("{DURATION}", text)
    return re.sub(r"alsiron \d+\.\d+\.\d+\S*", "alsiron {VERSION}", text)


def _scrub_json(value, work: Path):
    if isinstance(value, dict):
        return {k: ("{VOLATILE}" if k in _VOLATILE_KEYS else _scrub_json(v, work))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v, work) for v in value]
    if isinstance(value, str):
        return _scrub_text(value, work)
    return value


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(path: Path, work: Path):
    name = path.name
    if name.endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        return {"sha256": _sha(np.ascontiguousarray(data).tobytes()), "dtype": str(data.dtype),
                "shape": list(data.shape), "affine": np.round(img.affine, 6).tolist(),
                "zooms": [float(z) for z in img.header.get_zooms()],
                "scl": [float(x) if np.isfinite(x) else None
                        for x in (img.header["scl_slope"], img.header["scl_inter"])]}
    if name.endswith(".json"):
        return _scrub_json(json.loads(path.read_text()), work)
    if name.endswith((".tsv", ".txt", ".csv", ".md")):
        return _sha(_scrub_text(path.read_text(), work).encode())
    if name.endswith(".html"):
        # Pages embed their write time and the version; images are inline PNGs.
        return _sha(_scrub_text(path.read_text(), work).encode())
    if name.endswith((".sqlite", ".sqlite-wal", ".sqlite-shm", ".lock")):
        return "database (compared through registry export)"
    return _sha(path.read_bytes())


def run(work: Path, manifest: Path) -> None:
    exe = shutil.which("alsiron")
    if exe is None:
        sys.exit("alsiron is not on PATH")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    commands = {}
    for label, argv in COMMANDS:
        args = [a.replace("{W}", str(work)) for a in argv]
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        print(f"{label}: exit {proc.returncode}", file=sys.stderr, flush=True)
        commands[label] = {"exit": proc.returncode,
                           "stdout": _scrub_text(proc.stdout, work).splitlines(),
                           "stderr": _scrub_text(proc.stderr, work).splitlines()}
    files = {str(p.relative_to(work)): _fingerprint(p, work)
             for p in sorted(work.rglob("*")) if p.is_file()}
    manifest.write_text(json.dumps({"commands": commands, "files": files}, indent=1,
                                   sort_keys=True))
    print(f"{len(files)} files, {len(commands)} commands -> {manifest}", file=sys.stderr)


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{where}/{k}: only in new")
            elif k not in b:
                out.append(f"{where}/{k}: only in old")
            else:
                _diff(a[k], b[k], f"{where}/{k}", out)
    elif a != b:
        out.append(f"{where}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}")


#: Module paths that sidecar descriptions name, renamed by the re-housing of issue 12
#: (old → new). ``compare`` reports how many values differ only by these names and
#: counts them apart from real differences.
MODULE_RENAMES = {"alsiron.phantom.write_dataset": "alsiron.sim.phantom.write_dataset",
                  "(alsiron.records)": "(alsiron.cohort.records)"}


def _renamed(value):
    if isinstance(value, dict):
        return {k: _renamed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v) for v in value]
    if isinstance(value, str):
        for old, new in MODULE_RENAMES.items():
            value = value.replace(old, new)
    return value


def compare(old: Path, new: Path) -> int:
    a, b = json.loads(old.read_text()), json.loads(new.read_text())
    raw: list[str] = []
    _diff(a, b, "", raw)
    out: list[str] = []
    _diff(_renamed(a), b, "", out)
    for line in out:
        print(line)
    print(f"{len(a['files'])} files and {len(a['commands'])} commands compared: "
          f"{len(out)} difference(s); {len(raw) - len(out)} value(s) differ only by a "
          "renamed module path (MODULE_RENAMES)")
    return 1 if out else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        run(Path(sys.argv[2]).resolve(), Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)

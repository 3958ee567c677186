"""Peak memory of ``alsiron relax`` on a full-size subject (issue 3: < 3 GB).

Writes a synthetic BIDS subject — MEGRE 256×256×176, 8 echoes (3–24.5 ms), magnitude and
phase, an ellipsoidal head (R2* 20 s⁻¹, a smooth background field) in noise; optionally a
MESE of 128×128×44 × 16 echoes — as uncompressed NIfTI, then runs ``alsiron relax`` in a
child process under ``/usr/bin/time -v`` and prints its maximum resident set size.

Run ``python bench/relax_memory.py WORKDIR [--mese]`` (needs ~1.5 GB of disk).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (256, 256, 176)
TES = [0.003 + 0.003 * k for k in range(8)]
GAMMA_BAR = 42.577478e6


def _head(shape: tuple[int, ...]) -> np.ndarray:
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    return (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2 <= 1


def write_subject(root: Path, mese: bool) -> Path:
    """Write the subject under ``root``; return its folder."""
    anat = root / "sub-01" / "ses-01" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "memory", "BIDSVersion": "1.10.0"}))
    rng = np.random.default_rng(0)
    head = _head(SHAPE)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    x = np.linspace(-1, 1, SHAPE[0], dtype=np.float32)[:, None, None]
    z = np.linspace(-1, 1, SHAPE[2], dtype=np.float32)[None, None, :]
    field_ppm = (0.2 * x * z + 0.1 * z * z).astype(np.float32)
    for k, te in enumerate(TES, start=1):
        clean = np.where(head, np.float32(500 * np.exp(-20 * te)), np.float32(0))
        noise = rng.standard_normal((2, *SHAPE), dtype=np.float32) * np.float32(5)
        mag = np.hypot(clean + noise[0], noise[1])
        phase = np.angle(np.exp(1j * (2 * np.pi * GAMMA_BAR * 3.0 * te * 1e-6)
                                * field_ppm)).astype(np.float32)
        phase = np.ascontiguousarray(np.broadcast_to(phase, SHAPE))
        side = {"EchoTime": te, "MagneticFieldStrength": 3.0, "FlipAngle": 15,
                "RepetitionTime": 0.03}
        for part, data in (("mag", mag), ("phase", phase)):
            name = f"sub-01_ses-01_echo-{k}_part-{part}_MEGRE"
            nib.save(nib.Nifti1Image(data, affine), anat / f"{name}.nii")
            (anat / f"{name}.json").write_text(json.dumps(side))
    if mese:
        small = (128, 128, 44)
        head_m = _head(small)
        mese_affine = np.diag([2.0, 2.0, 4.0, 1.0])
        for k in range(1, 17):
            te = 0.01 * k
            clean = np.where(head_m, np.float32(1000 * np.exp(-te / 0.08)), np.float32(0))
            mag = np.abs(clean + rng.standard_normal(small, dtype=np.float32) * 10)
            name = f"sub-01_ses-01_echo-{k}_MESE"
            nib.save(nib.Nifti1Image(mag.astype(np.float32), mese_affine), anat / f"{name}.nii")
            (anat / f"{name}.json").write_text(json.dumps(
                {"EchoTime": te, "RefocusingFlipAngle": 180.0}))
    return root / "sub-01"


def main(argv: list[str]) -> int:
    work = Path(argv[0])
    subject = write_subject(work / "bids", "--mese" in argv)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "alsiron.cli", "relax", str(subject),
           "--out", str(work / "out"), "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", proc.stderr)
    if proc.returncode != 0 or peak is None:
        print(proc.stderr[-3000:])
        return 1
    print(f"peak RSS {int(peak.group(1)) / 1e6:.2f} GB, wall {wall.group(1) if wall else '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

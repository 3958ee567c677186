"""Hand-made tiny BIDS MEGRE datasets for ingestion and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

GAMMA_BAR = 42.577478e6


def write_megre_session(
    root: Path,
    *,
    sub: str = "01",
    ses: str | None = "01",
    echo_times: tuple[float, ...] = (0.004, 0.009, 0.014),
    shape: tuple[int, int, int] = (12, 10, 8),
    affine: np.ndarray | None = None,
    field_ppm: float = 0.05,
    b0: float = 3.0,
    sidecar_extra: dict | None = None,
    phase_transform=None,
) -> Path:
    """Write a small MEGRE series with a uniform field and R2* = 20 1/s; return anat dir."""
    affine = np.diag([2.0, 2.0, 2.5, 1.0]) if affine is None else affine
    folder = root / f"sub-{sub}"
    stem = f"sub-{sub}"
    if ses is not None:
        folder = folder / f"ses-{ses}"
        stem += f"_ses-{ses}"
    anat = folder / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0"}))
    rng = np.random.default_rng(0)
    for k, te in enumerate(echo_times, start=1):
        mag = (100 * np.exp(-20 * te) * (1 + 0.01 * rng.standard_normal(shape))).astype(np.float32)
        # A uniform field plus a linear phase ramp across x so every phase value occurs.
        ramp = np.linspace(-np.pi, np.pi, shape[0], endpoint=False)[:, None, None]
        phase = np.angle(np.exp(1j * (2 * np.pi * GAMMA_BAR * b0 * te * field_ppm * 1e-6
                                      + ramp * np.ones(shape)))).astype(np.float32)
        if phase_transform is not None:
            phase = phase_transform(phase)
        side = {"EchoTime": te, "MagneticFieldStrength": b0, "FlipAngle": 15,
                "RepetitionTime": 0.03, **(sidecar_extra or {})}
        for part, data in (("mag", mag), ("phase", phase)):
            name = f"{stem}_echo-{k}_part-{part}_MEGRE"
            nib.save(nib.Nifti1Image(data, affine), anat / f"{name}.nii.gz")
            (anat / f"{name}.json").write_text(json.dumps(side))
    return anat

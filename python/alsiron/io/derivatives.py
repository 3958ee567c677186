"""BIDS-derivatives naming, sidecars and writing of alsiron outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alsiron import __version__
from alsiron.errors import OutputExistsError
from alsiron.io.atomic import save_json, save_nifti, sidecar_path
from alsiron.volume import Volume

PIPELINE_NAME = "alsiron"


@dataclass
class DerivativeMap:
    """One output image: its BIDS suffix and ``desc`` entity, the map and a description."""

    suffix: str
    volume: Volume
    description: str
    desc: str | None = None


def derivatives_root(dataset_root: Path, out: str | os.PathLike[str] | None) -> Path:
    """Output root: ``out`` if given, else ``<dataset>/derivatives/alsiron``."""
    return Path(out) if out is not None else dataset_root / "derivatives" / PIPELINE_NAME


def write_dataset_description(root: Path) -> None:
    """Create the derivative dataset's ``dataset_description.json`` once."""
    path = root / "dataset_description.json"
    if path.exists():
        return
    save_json(path, {
        "Name": "alsiron outputs",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__}],
    })


def map_path(root: Path, entities: dict[str, str], suffix: str, desc: str | None = None) -> Path:
    """``root/sub-X[/ses-Y]/anat/<entities>[_desc-D]_<suffix>.nii.gz``."""
    folder = root / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    stem = "_".join(f"{k}-{v}" for k, v in entities.items())
    if desc:
        stem += f"_desc-{desc}"
    return folder / "anat" / f"{stem}_{suffix}.nii.gz"


def check_free(paths: list[Path], overwrite: bool) -> None:
    """Refuse up front when any output (image or sidecar) exists and overwrite is off.

    Checking before computing means a refused run does no work and leaves a finished
    set of outputs exactly as it was.
    """
    if overwrite:
        return
    for p in paths:
        for candidate in (p, sidecar_path(p)):
            if candidate.exists():
                raise OutputExistsError(
                    f"{candidate}: already exists (use --overwrite to replace the outputs)")


def write_maps(root: Path, entities: dict[str, str], maps: list[DerivativeMap],
               common: dict[str, Any], *, overwrite: bool = False) -> list[Path]:
    """Write each map with a sidecar: its units, description and the common provenance.

    Every file is written atomically (temporary file + rename).
    """
    write_dataset_description(root)
    written = []
    for m in maps:
        path = map_path(root, entities, m.suffix, m.desc)
        sidecar = {"Description": m.description, "Units": m.volume.units, **common}
        if m.volume.provenance:
            sidecar["MapProvenance"] = m.volume.provenance
        save_nifti(path, m.volume.data, m.volume.affine, sidecar=sidecar, overwrite=overwrite)
        written.append(path)
    return written

"""BIDS-derivatives naming, sidecars and writing of alsiron outputs, and the output plan
of a visit (every file a run will write, checked once before any work)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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


def dataset_relative(path: str | os.PathLike[str], dataset_root: str | os.PathLike[str] | None
                     ) -> str:
    """``path`` relative to the dataset root, POSIX form (``sub-01/anat/x.nii.gz``), so
    that provenance stays valid when the dataset moves; a file outside the dataset (or
    without a root) keeps its absolute path."""
    resolved = Path(path).resolve()
    if dataset_root is not None:
        base = Path(dataset_root).resolve()
        if resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
    return resolved.as_posix()


def input_provenance(sources: list[str], dataset_root: Path,
                     checksums: dict[str, str]) -> dict[str, Any]:
    """The input part of a map sidecar: ``Sources`` (the input files, relative to the
    dataset, :func:`dataset_relative`) and ``InputChecksums`` (file → SHA-256 hex, as
    :func:`alsiron.cohort.registry.input_checksums` gives them), so that a sidecar alone
    says which bytes made the map, with or without a registry."""
    return {"Sources": [dataset_relative(p, dataset_root) for p in sources],
            "InputChecksums": dict(checksums)}


def write_dataset_description(root: Path) -> None:
    """Create the derivative dataset's ``dataset_description.json`` once."""
    path = root / "dataset_description.json"
    if path.exists():
        return
    try:
        save_json(path, {
            "Name": "alsiron outputs",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__}],
        })
    except OutputExistsError:
        pass  # a parallel run wrote it between the check and the write


def map_path(root: Path, entities: dict[str, str], suffix: str, desc: str | None = None,
             *, ext: str = ".nii.gz") -> Path:
    """``root/sub-X[/ses-Y]/anat/<entities>[_desc-D]_<suffix><ext>`` (ext ``.nii.gz`` by
    default; ``.tsv``, ``.json``, ``.png`` for tables, z-scores and QC images)."""
    folder = root / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    stem = "_".join(f"{k}-{v}" for k, v in entities.items())
    if desc:
        stem += f"_desc-{desc}"
    return folder / "anat" / f"{stem}_{suffix}{ext}"


@dataclass(frozen=True)
class PlannedFile:
    """One output of a visit: its BIDS ``suffix``/``desc`` key, its path and the files
    written with it (sidecar JSON, label table), in the order they are checked."""

    suffix: str
    desc: str | None
    path: Path
    companions: tuple[Path, ...] = ()


@dataclass
class OutputPlan:
    """Every file one visit's run will write, computed once before any work.

    The run checks the whole plan with :meth:`check_free` before loading anything, and
    the writers take their paths from it (:meth:`path`), so the files checked are the
    files written.

    Attributes
    ----------
    root : Path
        Derivatives root of the run.
    entities : dict
        BIDS entities of the visit's series (``sub``, ``ses``, ``run``, ...).
    files : list of PlannedFile
        In checking order.
    """

    root: Path
    entities: dict[str, str]
    files: list[PlannedFile] = field(default_factory=list)

    def add_map(self, suffix: str, desc: str | None = None,
                extra: tuple[str, ...] = ()) -> Path:
        """Plan a NIfTI image with its JSON sidecar (and files of the same stem with the
        extensions in ``extra``, e.g. a dseg's ``.tsv``); returns the image path."""
        path = map_path(self.root, self.entities, suffix, desc)
        stem = path.name.removesuffix(".nii.gz")
        companions = (sidecar_path(path),) + tuple(path.with_name(stem + e) for e in extra)
        self.files.append(PlannedFile(suffix, desc, path, companions))
        return path

    def add_maps(self, names: list[tuple[str, str | None]]) -> None:
        """Plan a NIfTI image with its sidecar for every (suffix, desc) in ``names``."""
        for suffix, desc in names:
            self.add_map(suffix, desc)

    def add_file(self, suffix: str, desc: str | None, ext: str,
                 extra: tuple[str, ...] = ()) -> Path:
        """Plan a non-image file (``.tsv``, ``.json``, ``.png``) and files of the same stem
        with the extensions in ``extra``; returns its path."""
        path = map_path(self.root, self.entities, suffix, desc, ext=ext)
        companions = tuple(path.with_suffix(e) for e in extra)
        self.files.append(PlannedFile(suffix, desc, path, companions))
        return path

    def path(self, suffix: str, desc: str | None = None) -> Path:
        """The planned path of ``suffix``/``desc`` (KeyError when it was not planned)."""
        for f in self.files:
            if f.suffix == suffix and f.desc == desc:
                return f.path
        raise KeyError(f"{suffix} (desc {desc!r}) is not in the output plan")

    def relocated(self, folder: Path) -> OutputPlan:
        """The same plan with every file (companions included) moved into ``folder``
        under its own name: where a staged run writes (:mod:`alsiron.io.transaction`)."""
        def move(p: Path) -> Path:
            return Path(folder) / p.name

        return OutputPlan(self.root, dict(self.entities), [
            PlannedFile(f.suffix, f.desc, move(f.path), tuple(move(c) for c in f.companions))
            for f in self.files])

    def paths(self) -> list[Path]:
        """Every planned path, companions included, in checking order."""
        return [p for f in self.files for p in (f.path, *f.companions)]

    def check_free(self, overwrite: bool) -> None:
        """Refuse up front when any planned file exists and ``overwrite`` is off.

        Checking before computing means a refused run does no work and leaves a finished
        set of outputs exactly as it was.

        Raises
        ------
        OutputExistsError
            Naming the first existing file.
        """
        if overwrite:
            return
        for candidate in self.paths():
            if candidate.exists():
                raise OutputExistsError(
                    f"{candidate}: already exists (use --overwrite to replace the outputs)")


def write_maps(plan: OutputPlan, maps: list[DerivativeMap], common: dict[str, Any], *,
               overwrite: bool = False) -> list[Path]:
    """Write each map with a sidecar (its units, description and the common provenance)
    to its path in ``plan``.

    Every file is written atomically (temporary file + rename).
    """
    write_dataset_description(plan.root)
    written = []
    for m in maps:
        path = plan.path(m.suffix, m.desc)
        sidecar = {"Description": m.description, "Units": m.volume.units, **common}
        if m.volume.provenance:
            sidecar["MapProvenance"] = m.volume.provenance
        save_nifti(path, m.volume.data, m.volume.affine, sidecar=sidecar, overwrite=overwrite)
        written.append(path)
    return written

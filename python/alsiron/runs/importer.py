"""DICOM (or dcm2niix-style NIfTI + JSON) → de-identified BIDS, and ``alsiron qsm`` on any
folder.

:func:`import_dicom` is what ``alsiron import`` runs: every study of a DICOM folder is
labelled from the ``--map`` file, converted by dcm2niix, classified from its sidecars
(:mod:`alsiron.io.plain_folder`), written de-identified into a staging folder inside the
BIDS folder, checked for surviving identifiers and only then moved in, one visit folder
per rename, with ``participants.tsv`` / ``sessions.tsv`` updated last.
:func:`run_qsm_folder` runs ``alsiron qsm`` on a BIDS subject/session folder as before,
or on a plain NIfTI + JSON folder or a DICOM folder through the same conversion into a
temporary BIDS layout.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import alsiron
from alsiron.errors import AlsironError, InputError, OutputExistsError
from alsiron.io import deidentify, dicom, vendor_phase
from alsiron.io.atomic import save_json, save_text
from alsiron.io.plain_folder import ClassifiedFolder, Image, classify_folder
from alsiron.io.tables import read_tsv

log = logging.getLogger("alsiron")

Announce = Callable[[str], None]


@dataclass
class ImportedVisit:
    """One visit written into the BIDS folder.

    Attributes
    ----------
    subject, session : str
        Labels without ``sub-``/``ses-`` (session may be "").
    folder : Path
        The visit folder in the BIDS dataset.
    files : list of Path
        Images written (sidecars beside them).
    skipped : list of str
        Series not used, one line each.
    age : float or None
        Age at scan, years.
    sex : str or None
    """

    subject: str
    session: str
    folder: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    age: float | None = None
    sex: str | None = None


def _visit_dir(root: Path, subject: str, session: str) -> Path:
    folder = root / f"sub-{subject}"
    return folder / f"ses-{session}" if session else folder


def _prefix(subject: str, session: str) -> str:
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def _write_image(img: nib.Nifti1Image, data: np.ndarray, path: Path, *,
                 keep_scaling: bool) -> None:
    """Save ``data`` on ``img``'s grid with a clean header (see :mod:`.deidentify`)."""
    slope = inter = None
    if keep_scaling:
        s = getattr(img.dataobj, "slope", 1.0)
        i = getattr(img.dataobj, "inter", 0.0)
        slope, inter = (float(s) if s is not None else 1.0), (float(i) if i is not None
                                                              else 0.0)
    nib.save(deidentify.clean_image(data, img, slope=slope, inter=inter), str(path))


def _magnitude(im: Image, face: np.ndarray | None) -> tuple[nib.Nifti1Image, np.ndarray, bool]:
    """The stored values of a magnitude/T1w image and True (their scaling is kept); with
    ``face``, the face is zeroed (in scaled float32 values, False, when the header has an
    intercept, so that zero means zero)."""
    img = nib.load(str(im.path))
    raw = np.asanyarray(img.dataobj.get_unscaled())
    if raw.ndim == 4:
        raw = raw[..., 0]
    if face is None:
        return img, raw, True
    if getattr(img.dataobj, "inter", 0.0) not in (None, 0.0):
        scaled = np.asarray(img.get_fdata(dtype=np.float32))
        scaled = scaled[..., 0] if scaled.ndim == 4 else scaled
        return img, np.where(face, np.float32(0), scaled), False
    return img, np.where(face, np.zeros((), raw.dtype), raw), True


def _write_pair(im: Image, path: Path, data: np.ndarray, img: nib.Nifti1Image,
                keep_scaling: bool, extra: dict[str, Any], identifiers: set[str]) -> None:
    _write_image(img, data, path, keep_scaling=keep_scaling)
    side = deidentify.scrub_sidecar(im.meta, identifiers)
    side.update(extra)
    save_json(path.with_name(path.name.removesuffix(".nii.gz") + ".json"), side)


def _face_mask(image: Image, *, contrast: str) -> np.ndarray:
    """The face of one image; a failure refuses the import (de-identification fails
    closed: an image that cannot be defaced is not kept)."""
    from alsiron.motor.deface import face_mask

    img = nib.load(str(image.path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 4:
        data = data[..., 0]
    try:
        return face_mask(data, img.affine, contrast=contrast, name=str(image.path.name))
    except (AlsironError, ValueError) as exc:
        problem = exc.problem if isinstance(exc, InputError) else str(exc)
        raise InputError(image.path, f"{image.name}: cannot deface ({problem}); import "
                         "without --deface or leave the series out") from None


def write_visit(classified: ClassifiedFolder, root: Path, subject: str, session: str, *,
                identifiers: set[str] = frozenset(), deface: bool = False,
                announce: Announce | None = None) -> list[Path]:
    """Write one classified visit as BIDS ``anat`` files under ``root``.

    MEGRE: ``<prefix>[_run-K]_echo-N_part-{mag,phase}_MEGRE.nii.gz`` with the phase in
    radians (float32, vendor conventions applied, :mod:`alsiron.io.vendor_phase`);
    MESE: ``<prefix>[_run-K]_echo-N_MESE.nii.gz``; T1w: ``<prefix>[_run-K]_T1w.nii.gz``.
    Sidecars keep the allow-listed keys only; headers are rebuilt.  With ``deface`` the
    face of magnitude and T1w images is zeroed (:func:`alsiron.motor.deface.face_mask`).

    Returns
    -------
    list of Path
        The images written.
    """
    say = announce or (lambda _m: None)
    anat = _visit_dir(root, subject, session) / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    prefix = _prefix(subject, session)
    written: list[Path] = []

    def run(k: int, n: int) -> str:
        return f"_run-{k}" if n > 1 else ""

    for g, group in enumerate(classified.megre, start=1):
        face = _face_mask(group.echoes[0][1], contrast="gre") if deface else None
        say(f"{prefix}: {group.name}: {len(group.echoes)}-echo GRE, magnitude + phase")
        for echo, mag, ph in group.echoes:
            stem = f"{prefix}{run(g, len(classified.megre))}_echo-{echo}"
            img, raw, keep = _magnitude(mag, face)
            path = anat / f"{stem}_part-mag_MEGRE.nii.gz"
            _write_pair(mag, path, raw, img, keep, {"Defaced": True} if deface else {},
                        identifiers)
            phase, how, negated = vendor_phase.phase_radians(ph.path, ph.meta)
            ph_img = nib.load(str(ph.path))
            path_p = anat / f"{stem}_part-phase_MEGRE.nii.gz"
            extra = {"Units": "rad", "PhaseConversion": how}
            if negated:
                extra["PhaseNegated"] = True
            _write_pair(ph, path_p, phase, ph_img, False, extra, identifiers)
            written += [path, path_p]
    for s, series in enumerate(classified.mese, start=1):
        say(f"{prefix}: {series[0][1].name}: {len(series)}-echo spin echo")
        for echo, im in series:
            img, raw, keep = _magnitude(im, None)
            path = anat / f"{prefix}{run(s, len(classified.mese))}_echo-{echo}_MESE.nii.gz"
            _write_pair(im, path, raw, img, keep, {}, identifiers)
            written.append(path)
    for t, im in enumerate(classified.t1w, start=1):
        say(f"{prefix}: {im.name}: T1w")
        face = _face_mask(im, contrast="t1w") if deface else None
        img, raw, keep = _magnitude(im, face)
        path = anat / f"{prefix}{run(t, len(classified.t1w))}_T1w.nii.gz"
        _write_pair(im, path, raw, img, keep, {"Defaced": True} if deface else {},
                    identifiers)
        written.append(path)
    for line in classified.skipped:
        say(f"{prefix}: skipped {line}")
    return written


# --------------------------------------------------------------------------- tables
def _fmt(value: float | str | None) -> str:
    if value is None or value == "":
        return "n/a"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _merge_tsv(path: Path, key: str, rows: list[dict[str, str]], columns: list[str]) -> str:
    """The text of ``path`` with ``rows`` replacing (by ``key``) or joining its rows."""
    old = read_tsv(path) if path.is_file() else []
    header = list(old[0]) if old else []
    for c in [key, *columns]:
        if c not in header:
            header.append(c)
    if header[0] != key:
        header.remove(key)
        header.insert(0, key)
    new_keys = {r[key] for r in rows}
    merged = [r for r in old if r.get(key) not in new_keys] + rows
    merged.sort(key=lambda r: r.get(key, ""))
    lines = ["\t".join(header)]
    for r in merged:
        lines.append("\t".join(r.get(c) or "n/a" for c in header))
    return "\n".join(lines) + "\n"


def write_tables(root: Path, visits: list[ImportedVisit]) -> None:
    """Add the visits' age at scan and sex to ``participants.tsv`` (age at the first
    visit) and ``sub-X/sub-X_sessions.tsv`` (age and years since the first visit)."""
    by_subject: dict[str, list[ImportedVisit]] = {}
    for v in visits:
        by_subject.setdefault(v.subject, []).append(v)
    people = []
    for subject, vs in sorted(by_subject.items()):
        sub = f"sub-{subject}"
        ses_rows = []
        ages = [v.age for v in vs if v.age is not None]
        sessions_tsv = root / sub / f"{sub}_sessions.tsv"
        if any(v.session for v in vs):
            old = read_tsv(sessions_tsv) if sessions_tsv.is_file() else []
            for r in old:
                try:
                    ages.append(float(r.get("age") or "nan"))
                except ValueError:
                    pass
            ages = [a for a in ages if a == a]
            base = min(ages) if ages else None
            for v in vs:
                years = (None if v.age is None or base is None
                         else round(v.age - base, 2))
                ses_rows.append({"session_id": f"ses-{v.session}", "age": _fmt(v.age),
                                 "years_since_baseline": _fmt(years)})
            save_text(sessions_tsv, _merge_tsv(sessions_tsv, "session_id", ses_rows,
                                               ["age", "years_since_baseline"]),
                      overwrite=True)
        base = min(ages) if ages else None
        sex = next((v.sex for v in vs if v.sex), None)
        people.append({"participant_id": sub, "age": _fmt(base), "sex": _fmt(sex)})
    participants = root / "participants.tsv"
    save_text(participants, _merge_tsv(participants, "participant_id", people,
                                       ["age", "sex"]), overwrite=True)
    if not (root / "participants.json").exists():
        save_json(root / "participants.json", {
            "age": {"Description": "age at the first imported visit", "Units": "year"},
            "sex": {"Description": "sex from the DICOM header",
                    "Levels": {"M": "male", "F": "female", "O": "other"}}})
    if not (root / "dataset_description.json").exists():
        save_json(root / "dataset_description.json", {
            "Name": "alsiron import", "BIDSVersion": "1.10.0", "DatasetType": "raw",
            "GeneratedBy": [{"Name": "alsiron import", "Version": alsiron.__version__}]})


# --------------------------------------------------------------------------- staging
@contextmanager
def _staging(bids_dir: Path) -> Iterator[Path]:
    """A hidden staging folder inside ``bids_dir`` (same file system, so visits move in
    by rename), removed at the end whatever happens; ``bids_dir`` itself is removed
    again when this run created it and nothing was moved in."""
    created = not bids_dir.exists()
    bids_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".alsiron-import-", dir=bids_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(bids_dir.iterdir()):
            bids_dir.rmdir()


def _publish(stage: Path, bids_dir: Path, visits: list[ImportedVisit],
             overwrite: bool) -> None:
    """Move each staged visit folder into ``bids_dir`` (one rename each), replacing an
    existing one only with ``overwrite``; then the tables."""
    for v in visits:
        src = _visit_dir(stage, v.subject, v.session)
        dst = _visit_dir(bids_dir, v.subject, v.session)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            if not overwrite:
                raise OutputExistsError(f"{dst}: already exists (use --overwrite to "
                                        "replace it)")
            old = stage / f".replaced-{v.subject}-{v.session}"
            os.replace(dst, old)
        os.replace(src, dst)
        v.files = [dst / p.relative_to(src) for p in v.files]
        v.folder = dst
    write_tables(bids_dir, visits)


def _check_free(bids_dir: Path, labels: list[dicom.VisitLabel], overwrite: bool) -> None:
    for label in labels:
        dst = _visit_dir(bids_dir, label.subject, label.session)
        if dst.exists() and not overwrite:
            raise OutputExistsError(f"{dst}: already exists (use --overwrite to replace it)")
        if not label.session and (dst.is_dir() and any(dst.glob("ses-*"))):
            raise InputError(dst, "has session folders; give session_id in the mapping")


def _convert_studies(labelled: list[tuple[dicom.DicomStudy, dicom.VisitLabel]], stage: Path,
                     *, deface: bool, announce: Announce | None) -> list[ImportedVisit]:
    visits = []
    for study, label in labelled:
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=stage) as work:
            nifti = dicom.convert_study(study, Path(work))
            try:
                classified = classify_folder(nifti)
                files = write_visit(classified, stage, label.subject, label.session,
                                    identifiers=study.identifiers, deface=deface,
                                    announce=announce)
            except InputError as exc:
                # The converted files are temporary: name the DICOM folder instead.
                raise InputError(study.files[0].parent, exc.problem) from None
        visits.append(ImportedVisit(subject=label.subject, session=label.session,
                                    folder=_visit_dir(stage, label.subject, label.session),
                                    files=files, skipped=list(classified.skipped),
                                    age=study.age, sex=study.sex))
    return visits


def import_dicom(dicom_dir: str | Path, bids_dir: str | Path, map_path: str | Path, *,
                 deface: bool = False, overwrite: bool = False,
                 announce: Announce | None = None) -> list[ImportedVisit]:
    """Import every study of a DICOM folder into a BIDS dataset, de-identified.

    Parameters
    ----------
    dicom_dir : path
        Folder of DICOM files (any depth, any names; classic or enhanced).
    bids_dir : path
        BIDS dataset root (created when missing).
    map_path : path
        ``ids.tsv``: ``PatientID`` (or ``StudyInstanceUID``) → ``participant_id``,
        ``session_id`` (:func:`alsiron.io.dicom.read_id_map`).
    deface : bool
        Zero the face in magnitude and T1w images.
    overwrite : bool
        Replace visit folders that exist.
    announce : callable, optional
        Receives one line per series written or skipped.

    Returns
    -------
    list of ImportedVisit

    Raises
    ------
    InputError
        No DICOM files, a study the mapping does not cover, a series that cannot be
        classified, a missing echo, phase without magnitude, or an identifier that
        survived; nothing is left in ``bids_dir`` then.
    OutputExistsError
        A visit folder exists and ``overwrite`` is false (checked before converting).
    """
    dicom_dir, bids_dir, map_path = Path(dicom_dir), Path(bids_dir), Path(map_path)
    if not dicom_dir.is_dir():
        raise InputError(dicom_dir, "not a folder")
    files = dicom.find_dicom_files(dicom_dir)
    if not files:
        raise InputError(dicom_dir, "no DICOM files found (files with 'DICM' after the "
                         "128-byte preamble)")
    id_map = dicom.read_id_map(map_path)
    studies = dicom.scan_studies(files)
    if not studies:
        raise InputError(dicom_dir, "no DICOM images with a StudyInstanceUID found")
    labelled = dicom.label_studies(studies, id_map, map_path)
    _check_free(bids_dir, [label for _, label in labelled], overwrite)
    with _staging(bids_dir) as stage:
        visits = _convert_studies(labelled, stage, deface=deface, announce=announce)
        secrets = set().union(*(s.identifiers for s, _ in labelled))
        write_tables(stage, [*visits])
        deidentify.check_no_identifiers(stage, secrets)
        _publish(stage, bids_dir, visits, overwrite)
    return visits


# --------------------------------------------------------------------------- any folder
def folder_kind(folder: Path) -> str:
    """``bids`` (a ``sub-*``/``ses-*`` folder with ``anat/`` or ``ses-*/``), ``dicom``
    (holds DICOM files) or ``nifti`` (NIfTI + JSON files).

    Raises
    ------
    InputError
        None of these.
    """
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    name = folder.resolve().name
    bids_named = name.startswith(("sub-", "ses-"))
    if bids_named and ((folder / "anat").is_dir() or any(folder.glob("ses-*/anat"))):
        return "bids"
    if any(p.name.endswith((".nii", ".nii.gz")) for p in folder.iterdir()):
        return "nifti"
    if dicom.find_dicom_files(folder, limit=1):
        return "dicom"
    if bids_named:
        return "bids"  # the BIDS reader says what is missing
    raise InputError(folder, "neither a BIDS subject/session folder nor a folder of NIfTI + "
                     "JSON files or DICOM files")


_SUB_ENTITY = re.compile(r"(?:^|_)sub-([A-Za-z0-9]+)(?:_|\.)")


def folder_label(folder: Path, names: list[str]) -> str:
    """The subject label of a plain folder: the ``sub-`` entity its file names share, else
    the folder name made a BIDS label.

    Raises
    ------
    InputError
        File names with different ``sub-`` labels, or files whose label differs from a
        ``sub-XX`` folder name.
    """
    labels = {m[1] for n in names if (m := _SUB_ENTITY.search(n))}
    resolved = folder.resolve()
    if len(labels) > 1:
        raise InputError(folder, "file names carry different subject labels: "
                         + ", ".join(f"sub-{x}" for x in sorted(labels)))
    if labels:
        label = labels.pop()
        if resolved.name.startswith("sub-") and resolved.name[4:] != label:
            raise InputError(folder, f"file names say sub-{label} but the folder is "
                             f"{resolved.name}; rename the files or the folder")
        return label
    return dicom.sanitise_label(resolved.name)


def stage_folder(folder: Path, work: Path, *, announce: Announce | None = None
                 ) -> tuple[Path, str]:
    """A temporary BIDS layout of a plain NIfTI + JSON or DICOM folder under ``work``.

    Returns
    -------
    subject_dir : Path
        ``work/bids/sub-LABEL``.
    kind : str
        ``nifti`` or ``dicom``.
    """
    kind = folder_kind(folder)
    root = work / "bids"
    root.mkdir(parents=True, exist_ok=True)
    if kind == "nifti":
        label = folder_label(folder, [p.name for p in folder.iterdir()])
        classified = classify_folder(folder)
        write_visit(classified, root, label, "", announce=announce)
        write_tables(root, [ImportedVisit(subject=label, session="", folder=root)])
    elif kind == "dicom":
        label = dicom.sanitise_label(folder.resolve().name)
        studies = dicom.scan_studies(dicom.find_dicom_files(folder))
        if not studies:
            raise InputError(folder, "no DICOM images with a StudyInstanceUID found")
        labelled = dicom.single_study_label(studies, folder, label)
        visits = _convert_studies(labelled, root, deface=False, announce=announce)
        write_tables(root, visits)
    else:
        raise InputError(folder, "is a BIDS folder")
    return root / f"sub-{label}", kind


def run_qsm_folder(folder: str | Path, options: Any = None, *, out: str | Path | None = None,
                   announce: Announce | None = None, **kwargs: Any) -> Iterator[Any]:
    """:func:`alsiron.runs.qsm.run_qsm_subject` on any folder.

    A BIDS subject/session folder runs as before.  A plain folder of NIfTI + JSON (any
    names) or of DICOM files is converted into a temporary BIDS layout (same code as
    ``alsiron import``, label from the file names' ``sub-`` entity or the folder name)
    and its outputs go to ``<parent>/derivatives/alsiron`` unless ``out`` is given.

    Yields
    ------
    SessionOutcome
    """
    from alsiron.runs.qsm import run_qsm_subject

    folder = Path(folder)
    if not folder.is_dir() or folder_kind(folder) == "bids":
        yield from run_qsm_subject(folder, options, out=out, announce=announce, **kwargs)
        return
    say = announce or (lambda _m: None)
    out_root = Path(out) if out is not None else (
        folder.resolve().parent / "derivatives" / "alsiron")
    with tempfile.TemporaryDirectory(prefix="alsiron-qsm-") as work:
        subject_dir, kind = stage_folder(folder, Path(work), announce=announce)
        say(f"{folder}: {'DICOM' if kind == 'dicom' else 'NIfTI + JSON'} folder read as "
            f"{subject_dir.name}; outputs go to {out_root}")
        yield from run_qsm_subject(subject_dir, options, out=out_root, announce=announce,
                                   **kwargs)

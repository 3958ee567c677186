"""DICOM side of the importer: find DICOM files, read who and when each study is (pydicom),
map studies to BIDS labels from an ``ids.tsv`` file, and convert a study with the
``dcm2niix`` binary into NIfTI + JSON sidecars.

alsiron never decodes DICOM pixel data itself: dcm2niix (the PyPI package ships the
binary) does the conversion; pydicom reads only the identity headers, which stay in
memory and never reach a file the dataset keeps (docs/import.md).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alsiron.errors import InputError, InvalidInputError
from alsiron.io.tables import read_tsv

log = logging.getLogger("alsiron")

#: Identity tags read from every DICOM file (never written anywhere).
_IDENTITY_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
                  "SeriesDescription", "PatientAge", "PatientBirthDate", "PatientSex",
                  "StudyDate", "AcquisitionDate", "Modality", *[
                      # Read only to prove they are gone from the output (never kept).
                      "PatientName", "PatientAddress", "OtherPatientIDs", "OtherPatientNames",
                      "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                      "OperatorsName", "PerformingPhysicianName", "ReferringPhysicianName",
                      "DeviceSerialNumber", "StationName", "AccessionNumber", "SeriesDate",
                      "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime",
                      "ContentTime", "AcquisitionDateTime"]]
#: A BIDS label: letters and digits only.
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
#: dcm2niix options: BIDS sidecars, anonymised (no names, IDs or dates), gzip, merge 2-D
#: slices automatically, one output name per series (the echo and part come from the
#: sidecars, never from the file name).
DCM2NIIX_ARGS = ("-b", "y", "-ba", "y", "-z", "y", "-f", "s%s", "-w", "2")
#: Seconds a dcm2niix run may take per study before it is stopped.
DCM2NIIX_TIMEOUT_S = 1800


def dcm2niix_binary() -> str:
    """Path of the dcm2niix executable of the ``dcm2niix`` Python package (else on PATH).

    Raises
    ------
    InputError
        dcm2niix is not installed.
    """
    try:
        import dcm2niix  # the PyPI package ships the binary beside its __init__

        path = Path(dcm2niix.bin)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise InputError(None, "DICOM import needs dcm2niix (pip install dcm2niix)")
    return found


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is a DICOM Part-10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def find_dicom_files(folder: Path, *, limit: int | None = None) -> list[Path]:
    """DICOM files under ``folder`` (any depth, any file name), sorted; at most ``limit``."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_dicom_file(path):
                found.append(path)
                if limit is not None and len(found) >= limit:
                    return found
    return found


@dataclass
class DicomStudy:
    """One imaging study (a visit) of one patient, as its DICOM headers describe it.

    Only what the dataset keeps is derived from the identifiers (age at scan in years,
    sex); ``patient_id`` and ``study_uid`` are used to look up the label mapping and
    never written.

    Attributes
    ----------
    patient_id, study_uid : str
    files : list of Path
    age : float or None
        Age at scan, years (birth date vs study date when both are known, else
        ``PatientAge``).
    sex : str or None
        ``M``, ``F`` or ``O``.
    study_date : datetime.date or None
        Kept in memory to order visits; never written.
    """

    patient_id: str
    study_uid: str
    files: list[Path] = field(default_factory=list)
    age: float | None = None
    sex: str | None = None
    study_date: _dt.date | None = None
    identifiers: set[str] = field(default_factory=set)


def _parse_da(value: object) -> _dt.date | None:
    text = str(value or "").strip()
    if len(text) >= 8 and text[:8].isdigit():
        try:
            return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            return None
    return None


def _age_years(age_string: object, birth: _dt.date | None, when: _dt.date | None
               ) -> float | None:
    """Age at scan [years]: from the birth date when both dates are known (2 decimals),
    else from a DICOM AS value (``063Y``, ``018M``, ``010W``, ``005D``)."""
    if birth is not None and when is not None and when >= birth:
        return round((when - birth).days / 365.25, 2)
    text = str(age_string or "").strip().upper()
    m = re.fullmatch(r"(\d{1,3})([DWMY])", text)
    if m is None:
        return None
    per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[m[2]]
    return round(int(m[1]) / per_year, 2)


def _identifiers(ds: object) -> set[str]:
    """Identifying strings of one DICOM header (names whole and per component, IDs,
    addresses, serials, dates in DICOM and ISO form, times to the second)."""
    out: set[str] = set()
    for tag in _IDENTITY_TAGS:
        if tag in ("Modality", "SeriesNumber", "SeriesDescription", "PatientSex",
                   "PatientAge", "StudyInstanceUID", "SeriesInstanceUID"):
            continue
        value = getattr(ds, "get", lambda _k: None)(tag)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            text = str(v).strip()
            if not text:
                continue
            out.add(text)
            if "^" in text:
                out.update(p.strip() for p in text.split("^") if p.strip())
            if tag.endswith("Date") and len(text) >= 8 and text[:8].isdigit():
                out.add(f"{text[:4]}-{text[4:6]}-{text[6:8]}")
            if tag.endswith(("Time", "DateTime")):
                digits = text.split(".")[0]
                out.add(digits)
                if tag.endswith("Time") and len(digits) >= 6:
                    out.add(f"{digits[:2]}:{digits[2:4]}:{digits[4:6]}")
    return out


def scan_studies(files: Sequence[Path]) -> list[DicomStudy]:
    """Group DICOM files by study and read each study's age at scan and sex.

    Files without a StudyInstanceUID (a ``DICOMDIR`` index) are skipped.

    Raises
    ------
    InputError
        A file pydicom cannot read.
    """
    import pydicom

    studies: dict[str, DicomStudy] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_IDENTITY_TAGS)
        except Exception as exc:  # pydicom raises many types for damaged files
            raise InputError(path, f"cannot read DICOM header ({exc})") from None
        uid = str(ds.get("StudyInstanceUID") or "").strip()
        if not uid:
            # A DICOMDIR index or another non-image object: nothing to convert.
            log.info("%s: no StudyInstanceUID (a DICOMDIR?); skipped", path)
            continue
        study = studies.get(uid)
        if study is None:
            when = _parse_da(ds.get("StudyDate")) or _parse_da(ds.get("AcquisitionDate"))
            birth = _parse_da(ds.get("PatientBirthDate"))
            sex = str(ds.get("PatientSex") or "").strip().upper()[:1] or None
            study = studies[uid] = DicomStudy(
                patient_id=str(ds.get("PatientID") or "").strip(), study_uid=uid,
                age=_age_years(ds.get("PatientAge"), birth, when),
                sex=sex if sex in ("M", "F", "O") else None, study_date=when)
        study.files.append(path)
        study.identifiers |= _identifiers(ds)
    return sorted(studies.values(), key=lambda s: (s.patient_id, s.study_date or _dt.date.min,
                                                   s.study_uid))


@dataclass(frozen=True)
class VisitLabel:
    """BIDS labels of one study (without ``sub-``/``ses-``; ``session`` may be "")."""

    subject: str
    session: str


def _label(value: str, path: Path, column: str, prefix: str) -> str:
    label = value.strip().removeprefix(prefix)
    if label and not _LABEL_RE.match(label):
        raise InputError(path, f"{column} {value!r} is not a BIDS label (letters and digits "
                         f"only, optionally after '{prefix}')")
    return label


def read_id_map(path: Path) -> list[dict[str, str]]:
    """Rows of an ``ids.tsv`` mapping file, checked.

    Columns: ``participant_id`` (required), ``session_id`` (optional), and ``PatientID``
    and/or ``StudyInstanceUID`` (at least one non-empty per row).  Labels may carry
    their ``sub-``/``ses-`` prefixes.

    Raises
    ------
    InputError
        Missing columns, a row without a key, a label that is not a BIDS label, or two
        rows with the same key.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ID mapping file not found")
    rows = read_tsv(path)
    if not rows:
        raise InputError(path, "ID mapping file has no rows")
    header = set(rows[0])
    if "participant_id" not in header or not header & {"PatientID", "StudyInstanceUID"}:
        raise InputError(path, "ID mapping needs the columns participant_id and PatientID "
                         "(or StudyInstanceUID), tab-separated")
    seen: set[tuple[str, str]] = set()
    out = []
    for n, row in enumerate(rows, start=2):
        key = (row.get("PatientID", ""), row.get("StudyInstanceUID", ""))
        if not any(key):
            raise InputError(path, f"line {n}: neither PatientID nor StudyInstanceUID given")
        if key in seen:
            raise InputError(path, f"line {n}: the same PatientID/StudyInstanceUID as an "
                             "earlier line")
        seen.add(key)
        sub = _label(row.get("participant_id", ""), path, "participant_id", "sub-")
        if not sub:
            raise InputError(path, f"line {n}: empty participant_id")
        ses = _label(row.get("session_id", ""), path, "session_id", "ses-")
        out.append({"PatientID": key[0], "StudyInstanceUID": key[1], "subject": sub,
                    "session": ses})
    return out


def label_studies(studies: Sequence[DicomStudy], id_map: list[dict[str, str]],
                  map_path: Path) -> list[tuple[DicomStudy, VisitLabel]]:
    """The BIDS labels of every study from the mapping rows.

    A row with a ``StudyInstanceUID`` matches that study; a row with only a ``PatientID``
    matches that patient's study, which must then be the only one (visits of one patient
    need a ``StudyInstanceUID`` column to tell them apart).

    Raises
    ------
    InputError
        A study no row maps (named by one of its files), a PatientID-only row that
        matches several studies, or two studies mapped to the same subject and session.
    """
    labelled: list[tuple[DicomStudy, VisitLabel]] = []
    for study in studies:
        by_uid = [r for r in id_map if r["StudyInstanceUID"] == study.study_uid]
        rows = by_uid or [r for r in id_map if not r["StudyInstanceUID"]
                          and r["PatientID"] and r["PatientID"] == study.patient_id]
        if not rows:
            raise InputError(study.files[0], f"its study is not in {map_path.name}: add a "
                             "row with its PatientID (or StudyInstanceUID)")
        if not by_uid:
            same_patient = [s for s in studies if s.patient_id == study.patient_id]
            if len(same_patient) > 1:
                raise InputError(study.files[0], f"its PatientID has {len(same_patient)} "
                                 f"studies but {map_path.name} maps it by PatientID only; "
                                 "add a StudyInstanceUID column to tell the visits apart")
        labelled.append((study, VisitLabel(rows[0]["subject"], rows[0]["session"])))
    seen: dict[VisitLabel, DicomStudy] = {}
    for study, label in labelled:
        if label in seen:
            raise InputError(study.files[0], f"{map_path.name} maps two studies to "
                             f"sub-{label.subject}" + (f" ses-{label.session}"
                                                       if label.session else ""))
        seen[label] = study
    return labelled


def single_study_label(studies: Sequence[DicomStudy], folder: Path, subject: str
                       ) -> list[tuple[DicomStudy, VisitLabel]]:
    """Label the one study of a DICOM folder given without a mapping (``alsiron qsm``).

    Raises
    ------
    InputError
        The folder holds DICOMs of several patients or several studies.
    """
    patients = {s.patient_id for s in studies}
    if len(patients) > 1:
        raise InputError(folder, f"holds DICOMs of {len(patients)} different patients; "
                         "import them with 'alsiron import DICOM_DIR BIDS_DIR --map ids.tsv'")
    if len(studies) > 1:
        raise InputError(folder, f"holds {len(studies)} studies (visits) of one patient; "
                         "import them with 'alsiron import --map ids.tsv' (StudyInstanceUID "
                         "column)")
    return [(studies[0], VisitLabel(subject, ""))]


def convert_study(study: DicomStudy, work: Path) -> Path:
    """Convert one study's DICOM files with dcm2niix into ``work/nifti``.

    The files are linked into ``work/dicom`` first, so dcm2niix sees this study only.

    Returns
    -------
    Path
        Folder of ``*.nii.gz`` + ``*.json`` pairs.

    Raises
    ------
    InputError
        dcm2niix failed or produced nothing (its last message is quoted).
    """
    src = work / "dicom"
    out = work / "nifti"
    src.mkdir(parents=True)
    out.mkdir()
    for n, path in enumerate(study.files):
        link = src / f"{n:06d}.dcm"
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copy2(path, link)
    cmd = [dcm2niix_binary(), *DCM2NIIX_ARGS, "-o", str(out), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              timeout=DCM2NIIX_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise InputError(study.files[0], f"dcm2niix did not finish in {DCM2NIIX_TIMEOUT_S} s"
                         ) from None
    produced = sorted(out.glob("*.nii.gz"))
    if proc.returncode not in (0,) or not produced:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        if produced:
            log.warning("dcm2niix: %s", last)
        else:
            raise InputError(study.files[0].parent, f"dcm2niix converted nothing ({last})")
    return out


def sanitise_label(name: str) -> str:
    """A BIDS label from a folder name: letters and digits only (``subj_01`` → ``subj01``).

    Raises
    ------
    InvalidInputError
        Nothing usable is left.
    """
    label = re.sub(r"[^A-Za-z0-9]", "", name.removeprefix("sub-"))
    if not label:
        raise InvalidInputError(f"cannot make a BIDS subject label from the folder name "
                                f"{name!r}")
    return label

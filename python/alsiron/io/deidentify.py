"""De-identification of converted images: an allow-list of sidecar keys, NIfTI headers
rewritten without free-text fields, and a final scan of every kept byte for the
identifiers read from the DICOM headers.

Only the sidecar keys in :data:`SIDECAR_ALLOW` are kept (acquisition physics and scanner
model); everything else — names, IDs, dates and times, institution, operator, device
serial numbers, station names, free-text descriptions — is dropped, including keys a
future dcm2niix adds.  NIfTI headers are rebuilt from the data and affine alone, so the
``descrip`` field (dcm2niix writes the acquisition time there), ``aux_file``,
``db_name``, ``intent_name`` and header extensions are empty.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from alsiron.errors import InputError

#: Sidecar keys a de-identified dataset keeps (acquisition physics, scanner model,
#: conversion software).  Strings among them are also checked against the identifiers.
SIDECAR_ALLOW = frozenset({
    "Modality", "MagneticFieldStrength", "ImagingFrequency", "Manufacturer",
    "ManufacturersModelName", "SoftwareVersions", "MRAcquisitionType", "ScanningSequence",
    "SequenceVariant", "ScanOptions", "SequenceName", "PulseSequenceType", "ImageType",
    "EchoNumber", "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle",
    "RefocusingFlipAngle", "EchoTrainLength", "SliceThickness", "SpacingBetweenSlices",
    "PixelBandwidth", "DwellTime", "PhaseEncodingDirection",
    "InPlanePhaseEncodingDirectionDICOM", "ImageOrientationPatientDICOM",
    "AcquisitionMatrixPE", "ReconMatrixPE", "BaseResolution", "PhaseResolution",
    "PercentPhaseFOV", "PercentSampling", "PartialFourier",
    "ParallelReductionFactorInPlane", "ParallelReductionFactorOutOfPlane",
    "ParallelAcquisitionTechnique", "MatrixCoilMode", "CoilCombinationMethod",
    "ReceiveCoilName", "SpoilingState", "NonlinearGradientCorrection", "MTState",
    "PatientPosition", "BodyPart", "ConversionSoftware", "ConversionSoftwareVersion",
    "PhilipsRescaleSlope", "PhilipsRescaleIntercept", "PhilipsScaleSlope",
    "PhilipsRWVSlope", "PhilipsRWVIntercept",
})
#: Identifier strings shorter than this are not searched for (they occur by chance).
MIN_IDENTIFIER_LENGTH = 4
#: Purely numeric identifiers shorter than this are not searched for either: a 4-digit
#: serial would match sidecar numbers (a bandwidth of 1234 Hz) and abort every import.
MIN_NUMERIC_IDENTIFIER_LENGTH = 6


def scrub_sidecar(meta: dict[str, Any], identifiers: Iterable[str] = ()) -> dict[str, Any]:
    """The allow-listed part of a sidecar; any string value holding one of
    ``identifiers`` is dropped too (an operator may type a name into any text field)."""
    pattern = identifier_pattern(identifiers)

    def clean(value: Any) -> bool:
        return pattern is None or pattern.search(str(value).lower()) is None

    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key not in SIDECAR_ALLOW:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, (str, list)) and not clean(value):
            continue
        out[key] = value
    return out


def identifier_pattern(identifiers: Iterable[str]) -> re.Pattern[str] | None:
    """One lower-case regex matching any identifier as a whole token (not inside a longer
    run of letters and digits, so a serial ``1660`` does not match ``16600``)."""
    ids = sorted({s.lower() for s in identifiers if len(s) >= MIN_IDENTIFIER_LENGTH
                  and not (s.isdigit() and len(s) < MIN_NUMERIC_IDENTIFIER_LENGTH)},
                 key=len, reverse=True)
    if not ids:
        return None
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(re.escape(s) for s in ids)
                      + r")(?![a-z0-9])")


def clean_image(data: np.ndarray, like: nib.Nifti1Image, *,
                slope: float | None = None, inter: float | None = None) -> nib.Nifti1Image:
    """A new NIfTI-1 image of ``data`` on ``like``'s grid with an empty header otherwise.

    qform/sform (and their codes) and the space/time units are copied; ``slope`` and
    ``inter`` set the scaling of integer data.
    """
    img = nib.Nifti1Image(data, None)
    img.set_sform(like.get_sform(), code=int(like.header["sform_code"]))
    img.set_qform(like.get_qform(), code=int(like.header["qform_code"]))
    img.header.set_xyzt_units(*like.header.get_xyzt_units())
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    return img


def image_header_bytes(path: Path) -> bytes:
    """The header part of a NIfTI file (decompressed for ``.gz``): 352 bytes plus
    extensions, up to the data offset."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(352)
        if len(head) < 352:
            return head
        offset = int(np.frombuffer(head[108:112], dtype="<f4")[0])
        if offset <= 352 or offset > 1 << 24:
            offset = int(np.frombuffer(head[108:112], dtype=">f4")[0])
        more = fh.read(max(0, min(offset, 1 << 24) - 352))
    return head + more


def find_identifiers(folder: Path, identifiers: Iterable[str]) -> tuple[Path, str] | None:
    """The first kept file whose text (JSON, TSV) or NIfTI header holds an identifier.

    Returns (file, the identifier found) or None; callers must not print the identifier.
    """
    pattern = identifier_pattern(identifiers)
    if pattern is None:
        return None
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.name.endswith((".nii", ".nii.gz")):
            blob = image_header_bytes(path)
        elif path.suffix in (".json", ".tsv", ".txt", ".md"):
            blob = path.read_bytes()
        else:
            continue
        hit = pattern.search(blob.decode("latin-1").lower())
        if hit is not None:
            return path, hit.group(0)
    return None


def check_no_identifiers(folder: Path, identifiers: Iterable[str]) -> None:
    """Refuse a staged dataset in which an identifier survived.

    Raises
    ------
    InputError
        Naming the file (never the identifier).
    """
    found = find_identifiers(folder, identifiers)
    if found is not None:
        raise InputError(found[0].name, "an identifier from the DICOM headers survived "
                         "de-identification; nothing was imported (report this as a bug)")

"""Ingestion: find and load multi-echo GRE series from a BIDS dataset.

Accepted inputs are a subject folder (``sub-XX/``, with or without ``ses-*/``) or a
session folder (``sub-XX/ses-YY/``). Echoes are the ``echo-<K>`` entity, magnitude and
phase the ``part-mag`` / ``part-phase`` entity of ``*_MEGRE.nii[.gz]`` files in ``anat/``.
Every problem is reported as an :class:`~alsiron.errors.InputError` naming the file.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from alsiron.constants import GAMMA_BAR_HZ_PER_T
from alsiron.errors import InputError, InvalidInputError
from alsiron.grid import voxel_size_from_affine
from alsiron.volume import MegreSeries, MeseSeries, wrap_phase

log = logging.getLogger("alsiron")

_MEGRE_RE = re.compile(r"^(?P<stem>sub-[^_]+.*)_MEGRE\.nii(\.gz)?$")
_MESE_RE = re.compile(r"^(?P<stem>sub-[^_]+.*)_MESE\.nii(\.gz)?$")
_ENTITY_RE = re.compile(r"^(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)$")
#: Phase values within this distance of ±π are still taken as radians.
_RADIAN_TOL = 1e-3
#: Field strengths outside this range [T] are refused as implausible for MRI.
_FIELD_RANGE_T = (0.05, 12.0)


@dataclass(frozen=True)
class EchoFiles:
    """Magnitude and phase image paths of one echo."""

    echo: int
    magnitude: Path
    phase: Path


@dataclass
class MegreFileSet:
    """The files of one MEGRE series (all echoes) in one session.

    ``entities`` holds the BIDS entities shared by the files, without ``echo`` and
    ``part`` (e.g. ``{"sub": "01", "ses": "01", "acq": "wb"}``), in filename order.
    """

    entities: dict[str, str]
    echoes: list[EchoFiles]
    session_dir: Path

    @property
    def prefix(self) -> str:
        """BIDS filename prefix of the series, e.g. ``sub-01_ses-01``."""
        return "_".join(f"{k}-{v}" for k, v in self.entities.items())


@dataclass
class SessionInput:
    """One session (or a subject without sessions) and the MEGRE series found in it."""

    subject: str
    session: str
    path: Path
    series: list[MegreFileSet] = field(default_factory=list)


def load_mask(path: str | Path, series: MegreSeries, *, label: int | None = None
              ) -> np.ndarray:
    """Load a user mask (nonzero = inside, or ``== label`` for a label image) and check
    that it lies on the data's grid.

    Raises
    ------
    InputError
        Unreadable file, a shape or affine different from the MEGRE data, or an empty mask.
    """
    path = Path(path)
    data, _, affine = _load_image(path)
    if data.shape != series.shape:
        raise InputError(path, f"mask shape {data.shape} differs from the data's {series.shape}")
    if not np.allclose(affine, series.affine, atol=1e-3):
        raise InputError(path, "mask affine differs from the data's (resample it to the "
                         "MEGRE grid first)")
    mask = np.isfinite(data) & ((data != 0) if label is None else (data == label))
    if not mask.any():
        raise InputError(path, "mask is empty" if label is None
                         else f"no voxel has label {label}")
    return mask


#: Units accepted for a user field map (sidecar ``Units``).
FIELDMAP_UNITS = ("ppm", "Hz", "rad/s")


def load_fieldmap(path: str | Path, series: MegreSeries) -> np.ndarray:
    """Load a user total-field map on the data's grid and convert it to ppm of B0.

    The units come from the JSON sidecar beside the NIfTI (``Units``: "ppm", "Hz" or
    "rad/s"; BIDS fieldmaps use "Hz"); Hz and rad/s are converted with the series' field
    strength: ppm = Hz / (γ̄·B0)·1e6.

    Raises
    ------
    InputError
        Unreadable file, no sidecar or no/unknown ``Units``, a 4-D image, a shape or
        affine different from the MEGRE data, or non-finite values inside the volume.
    """
    path = Path(path)
    data, _, affine = _load_image(path)
    sidecar = path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".json")
    if not sidecar.is_file():
        raise InputError(path, f"no JSON sidecar {sidecar.name} giving its Units "
                         f"({', '.join(FIELDMAP_UNITS)})")
    units = read_json_sidecar(sidecar).get("Units")
    if units not in FIELDMAP_UNITS:
        raise InputError(sidecar, f"Units is {units!r}; a field map needs one of "
                         f"{', '.join(FIELDMAP_UNITS)}")
    if data.ndim != 3:
        raise InputError(path, f"field map must be 3-D, got shape {data.shape}")
    if data.shape != series.shape:
        raise InputError(path, f"field map shape {data.shape} differs from the data's "
                         f"{series.shape}")
    if not np.allclose(affine, series.affine, atol=1e-3):
        raise InputError(path, "field map affine differs from the data's (resample it to "
                         "the MEGRE grid first)")
    if not np.all(np.isfinite(data)):
        raise InputError(path, f"{int(np.sum(~np.isfinite(data)))} non-finite voxels; set "
                         "them to 0 (they are excluded by the mask)")
    hz_per_ppm = GAMMA_BAR_HZ_PER_T * series.field_strength * 1e-6
    if units == "Hz":
        data = data / hz_per_ppm
    elif units == "rad/s":
        data = data / (2.0 * np.pi * hz_per_ppm)
    return np.asarray(data, dtype=np.float32)


def dataset_root(path: str | Path) -> Path:
    """The BIDS dataset root above a subject or session folder.

    The nearest ancestor holding ``dataset_description.json``; failing that, the
    parent of the ``sub-*`` folder.
    """
    path = Path(path).resolve()
    for candidate in [path, *path.parents]:
        if (candidate / "dataset_description.json").is_file():
            return candidate
    for candidate in [path, *path.parents]:
        if candidate.name.startswith("sub-"):
            return candidate.parent
    return path.parent


def find_sessions(path: str | Path) -> list[SessionInput]:
    """List the sessions with MEGRE data under a subject or session folder.

    Parameters
    ----------
    path : path
        ``sub-XX/`` (with or without ``ses-*`` folders) or ``sub-XX/ses-YY/``.

    Returns
    -------
    list of SessionInput
        Sorted by session label; each with at least one complete MEGRE series.

    Raises
    ------
    InputError
        The folder does not exist, is not a BIDS subject/session folder, or holds no
        usable MEGRE series.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "not a folder (expected a BIDS sub-XX/ or sub-XX/ses-YY/ folder)")
    resolved = path.resolve()
    if resolved.name.startswith("ses-") and resolved.parent.name.startswith("sub-"):
        subject = resolved.parent.name[4:]
        session_dirs = [(resolved.name[4:], resolved)]
    elif resolved.name.startswith("sub-"):
        subject = resolved.name[4:]
        ses = sorted(p for p in resolved.iterdir() if p.is_dir() and p.name.startswith("ses-"))
        session_dirs = [(p.name[4:], p) for p in ses] if ses else [("", resolved)]
    else:
        raise InputError(path, "not a BIDS subject or session folder (name must start with "
                         "'sub-' or 'ses-')")

    sessions = []
    for label, sdir in session_dirs:
        series = _find_megre_series(sdir)
        if series:
            sessions.append(SessionInput(subject=subject, session=label, path=sdir,
                                         series=series))
    if not sessions:
        raise InputError(path, "no *_MEGRE.nii[.gz] files with part-mag and part-phase found "
                         "in anat/")
    return sessions


def _parse_entities(stem: str) -> dict[str, str]:
    entities: dict[str, str] = {}
    for token in stem.split("_"):
        m = _ENTITY_RE.match(token)
        if m is None:
            continue
        entities[m["key"]] = m["value"]
    return entities


def check_folder_labels(path: Path, entities: dict[str, str], session_dir: Path) -> None:
    """Refuse a file whose ``sub-``/``ses-`` entities disagree with the folders holding it.

    Outputs and the registry record are named from the file names, so ``sub-01/`` holding
    ``sub-02_*`` files would write (and with ``--overwrite`` replace) sub-02's results.
    ``session_dir`` is the ``sub-XX/`` or ``sub-XX/ses-YY/`` folder above ``anat/``.

    Raises
    ------
    InputError
        Naming the file, its label and the folder's.
    """
    folder = session_dir.resolve()
    if folder.name.startswith("ses-") and folder.parent.name.startswith("sub-"):
        subject, session = folder.parent.name[4:], folder.name[4:]
    elif folder.name.startswith("sub-"):
        subject, session = folder.name[4:], None
    else:
        return  # not a BIDS subject/session folder: nothing to compare with
    if entities.get("sub") != subject:
        raise InputError(path, f"file name says sub-{entities.get('sub')} but it lies in the "
                         f"folder sub-{subject}/; rename the file or move it")
    if entities.get("ses") != session:
        where = f"the folder ses-{session}/" if session is not None else "no ses-* folder"
        named = f"ses-{entities['ses']}" if "ses" in entities else "no session"
        raise InputError(path, f"file name says {named} but it lies in {where}; rename the "
                         "file or move it")


#: Echo files of one series: echo number → part (None without ``parts``) → path.
_EchoGroups = dict[tuple[tuple[str, str], ...], dict[int, dict[str | None, Path]]]


def _scan_echo_files(session_dir: Path, suffix: str,
                     parts: tuple[str, ...] | None = None) -> _EchoGroups:
    """The one echo-file scanner: ``anat/*_<suffix>.nii[.gz]`` of a session, grouped by
    their other BIDS entities (filename order), then by ``echo-<K>`` and, with ``parts``,
    by ``part-<label>`` (files with another part are skipped, with a warning).

    Raises
    ------
    InputError
        A file without a numeric ``echo-<K>`` entity, or two files for one echo (part).
    """
    anat = session_dir / "anat"
    if not anat.is_dir():
        return {}
    pattern = _MEGRE_RE if suffix == "MEGRE" else _MESE_RE
    groups: _EchoGroups = {}
    for f in sorted(anat.iterdir()):
        m = pattern.match(f.name)
        if m is None:
            continue
        ents = _parse_entities(m["stem"])
        check_folder_labels(f, ents, session_dir)
        part = None
        if parts is not None:
            part = ents.pop("part", None)
            if part not in parts:
                # A complex or real/imaginary part is not supported yet; name it.
                if part is not None:
                    log.warning("%s: part-%s is not used (only %s)", f, part,
                                "/".join(f"part-{p}" for p in parts))
                continue
        echo = ents.pop("echo", None)
        if echo is None or not echo.isdigit():
            raise InputError(f, f"{suffix} file without a numeric echo-<K> entity")
        per_echo = groups.setdefault(tuple(ents.items()), {}).setdefault(int(echo), {})
        if part in per_echo:
            raise InputError(f, f"duplicate echo-{echo} part-{part} file" if parts is not None
                             else f"duplicate echo-{echo} {suffix} file")
        per_echo[part] = f
    return groups


def _find_megre_series(session_dir: Path) -> list[MegreFileSet]:
    result = []
    for key, echoes in _scan_echo_files(session_dir, "MEGRE", ("mag", "phase")).items():
        files = []
        for echo in sorted(echoes):
            parts = echoes[echo]
            for needed in ("mag", "phase"):
                if needed not in parts:
                    other = next(iter(parts.values()))
                    raise InputError(other, f"echo-{echo} has no matching part-{needed} file")
            files.append(EchoFiles(echo=echo, magnitude=parts["mag"], phase=parts["phase"]))
        result.append(MegreFileSet(entities=dict(key), echoes=files, session_dir=session_dir))
    return result


def read_sidecar(image_path: Path) -> dict[str, Any]:
    """Read the JSON sidecar beside a NIfTI image ({} when there is none)."""
    name = image_path.name
    stem = name[:-7] if name.endswith(".nii.gz") else name[:-4]
    side = image_path.with_name(stem + ".json")
    if not side.is_file():
        return {}
    return read_json_sidecar(side)


def read_json_sidecar(side: Path) -> dict[str, Any]:
    """Parse a JSON sidecar file into a dict.

    Raises
    ------
    InputError
        Naming the file: unreadable, not UTF-8, not JSON, nested too deeply to parse
        (``RecursionError``), or not a JSON object.
    """
    try:
        text = side.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(side, f"cannot read JSON sidecar ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(side, f"JSON sidecar is not UTF-8 text (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(side, f"cannot read JSON sidecar ({exc})") from None
    except RecursionError:
        raise InputError(side, "JSON sidecar is nested too deeply to be a sidecar") from None
    if not isinstance(obj, dict):
        raise InputError(side, "JSON sidecar is not an object")
    return obj


def b0_direction_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Unit B0 direction in voxel-index space (i, j, k) derived from a NIfTI affine.

    B0 points along the scanner z axis, which is the world (RAS+) z axis of a NIfTI
    affine. Its components along the voxel axes are the z components of the
    normalised affine columns: for an axial acquisition this is (0, 0, 1), for an
    oblique slab it is tilted. Sheared affines are projected on their nearest rotation.
    """
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(rot)):
        raise ValueError("affine has a zero or non-finite voxel axis")
    unit = rot / norms
    u, _, vt = np.linalg.svd(unit)
    nearest = u @ vt
    if not np.allclose(unit, nearest, atol=1e-4):
        log.warning("affine is sheared; B0 direction taken from its nearest rotation")
    b = nearest.T @ np.array([0.0, 0.0, 1.0])
    b /= np.linalg.norm(b)
    return (float(b[0]), float(b[1]), float(b[2]))


def phase_to_radians(values: np.ndarray, raw: np.ndarray | None,
                     path: Path) -> tuple[np.ndarray, str]:
    """Bring a phase image to radians in (-pi, pi].

    Handles phase already in radians, phase in [0, 2pi), integer-coded phase (e.g.
    Siemens -4096..4094 or 0..4095: the code range, rounded up to a power of two,
    spans 2pi; unsigned codes start at -pi, signed codes are centred on 0), and phase
    stored in radians whose header scaling (``scl_slope``) would shrink it (then the
    unscaled values are used).

    Parameters
    ----------
    values : ndarray
        Phase with the header scaling applied.
    raw : ndarray or None
        Unscaled stored values when the header has a non-trivial scaling, else None.
    path : Path
        File name for messages.

    Returns
    -------
    phase : ndarray, float32
        Radians within (-pi, pi].
    conversion : str
        What was done, for the provenance record.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError(path, "phase image has no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    pi = math.pi
    if lo >= -pi - _RADIAN_TOL and hi <= pi + _RADIAN_TOL:
        if raw is not None:
            rfin = raw[np.isfinite(raw)]
            rlo, rhi = float(rfin.min()), float(rfin.max())
            if (rlo >= -pi - _RADIAN_TOL and rhi <= pi + _RADIAN_TOL
                    and (hi - lo) < 0.1 * (rhi - rlo)):
                return (wrap_phase(raw.astype(np.float32)),
                        "stored values are radians; header scl_slope/scl_inter ignored")
        return wrap_phase(values.astype(np.float32)), "none (radians)"
    if lo >= -_RADIAN_TOL and hi <= 2 * pi + _RADIAN_TOL:
        return wrap_phase(values.astype(np.float32)), "wrapped from [0, 2pi) to (-pi, pi]"
    sample = finite[: min(finite.size, 100_000)]
    if np.allclose(sample, np.round(sample), atol=1e-3):
        # Vendor codes follow fixed conventions, not the data's own extremes: unsigned
        # codes 0..n-1 map to [-pi, pi), signed codes -n/2..n/2-1 map to [-pi, pi).
        if lo >= 0:
            n_codes = 2 ** math.ceil(math.log2(hi + 1.0))
            scaled = values.astype(np.float64) * (2 * pi / n_codes) - pi
        else:
            n_codes = 2 * 2 ** math.ceil(math.log2(max(-lo, hi + 1.0)))
            scaled = values.astype(np.float64) * (2 * pi / n_codes)
        return (wrap_phase(scaled.astype(np.float32)),
                f"integer phase codes {lo:g}..{hi:g} mapped to radians ({n_codes} codes = 2pi)")
    raise InputError(path, f"phase values span [{lo:.4g}, {hi:.4g}]: neither radians nor "
                     "integer-coded phase; convert it to radians in (-pi, pi]")


#: Environment variable: the largest image alsiron reads, in bytes once loaded as float32.
MAX_IMAGE_BYTES_ENV = "ALSIRON_MAX_IMAGE_BYTES"
#: Default ceiling bounds [bytes]: an eighth of the available memory, within these.
_DEFAULT_MAX_IMAGE_BYTES = (256 << 20, 2 << 30)
#: Voxel edges above this [mm] are refused as implausible for MRI (a corrupt header).
MAX_VOXEL_MM = 20.0
_INFLATE_BLOCK = 1 << 20


def _available_memory() -> int:
    """Memory the system can give without swapping, bytes (MemAvailable; 8 GiB unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def max_image_bytes() -> int:
    """The largest image [bytes, as float32 in memory] alsiron agrees to read.

    ``$ALSIRON_MAX_IMAGE_BYTES`` when set; else an eighth of the available memory,
    clipped to 256 MiB–2 GiB (a 2 GiB float32 image is 800³ voxels, beyond any MRI
    volume this pipeline processes).

    Raises
    ------
    InvalidInputError
        The environment variable is not a positive number.
    """
    env = os.environ.get(MAX_IMAGE_BYTES_ENV)
    if env:
        try:
            value = int(float(env))
        except ValueError:
            value = 0
        if value <= 0:
            raise InvalidInputError(f"{MAX_IMAGE_BYTES_ENV} must be a positive number of "
                                    f"bytes, got {env!r}")
        return value
    low, high = _DEFAULT_MAX_IMAGE_BYTES
    return min(high, max(low, _available_memory() // 8))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= (1 << 30) else f"{n / (1 << 20):.1f} MiB"


def _stored_bytes(path: Path, needed: int) -> int:
    """Bytes the file holds after decompression, counted up to ``needed`` at most.

    A ``.gz`` file is inflated block by block and the blocks dropped, stopping as soon
    as ``needed`` bytes have come out: memory stays at one block whatever the file claims.
    """
    if not path.name.endswith(".gz"):
        return path.stat().st_size
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while total < needed:
                block = fh.read(min(_INFLATE_BLOCK, needed - total))
                if not block:
                    break
                total += len(block)
    except EOFError:
        pass  # a truncated stream: what came out before the cut is what the file holds
    except (OSError, zlib.error) as exc:
        raise InputError(path, f"cannot read NIfTI image (corrupt gzip data: {exc})") from None
    return total


def check_image_header(path: Path, img: Any) -> None:
    """Cheap checks of a NIfTI header before any image data is read.

    Refuses complex-valued data, a non-finite affine, voxel edges outside
    (0, :data:`MAX_VOXEL_MM`] mm, an image larger in memory than :func:`max_image_bytes`,
    and a file holding fewer data bytes than the header claims (streamed for ``.gz``,
    so a small file claiming gigabytes costs neither the memory nor the time).

    Raises
    ------
    InputError
        One line naming the file and the problem.
    """
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind == "c":
        raise InputError(path, f"complex-valued image ({dtype}); give magnitude and phase as "
                         "separate real-valued images")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine (sform/qform) holds NaN or infinite values: the "
                         "image's position and voxel size are unknown")
    voxel = voxel_size_from_affine(affine)
    if not all(0.0 < v <= MAX_VOXEL_MM for v in voxel):
        raise InputError(path, "voxel size " + " x ".join(f"{v:.4g}" for v in voxel)
                         + f" mm is outside (0, {MAX_VOXEL_MM:g}] mm: a corrupt header?")
    n_voxels = math.prod(int(n) for n in img.shape)
    stored = n_voxels * dtype.itemsize
    in_memory = max(stored, n_voxels * 4)
    limit = max_image_bytes()
    if in_memory > limit:
        raise InputError(path, f"image of shape {tuple(img.shape)} ({dtype}) would take "
                         f"{_gib(in_memory)} of memory, over the limit of {_gib(limit)} "
                         f"(set {MAX_IMAGE_BYTES_ENV} to raise it)")
    # The data proxy knows where the data start (the loaded header's copy says 0).
    offset = getattr(img.dataobj, "offset", None)
    if not isinstance(offset, int) or not path.name.endswith((".nii", ".nii.gz")):
        return
    needed = offset + stored
    held = _stored_bytes(path, needed)
    if held < needed:
        raise InputError(path, f"header claims {stored} bytes of image data (shape "
                         f"{tuple(img.shape)}, {dtype}) but the file holds "
                         f"{max(held - offset, 0)}: truncated or not a real image")


def _load_image(path: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Load a 3-D image: (scaled float data, unscaled data if scaled else None, affine).

    The header is checked first (:func:`check_image_header`), so hostile or truncated
    files are refused before their data are read.
    """
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot read NIfTI image ({exc})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3-D image per echo, got shape {img.shape}")
    check_image_header(path, img)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:
        raise InputError(path, f"cannot read image data ({exc or type(exc).__name__})"
                         ) from None
    raw = None
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    if (slope not in (None, 1.0)) or (inter not in (None, 0.0)):
        raw = np.asarray(img.dataobj.get_unscaled(), dtype=np.float32).reshape(shape)
    return data, raw, np.asarray(img.affine, dtype=np.float64)


def _echo_time(sidecar: dict[str, Any], path: Path) -> float | None:
    te = sidecar.get("EchoTime")
    if te is None:
        return None
    if not isinstance(te, (int, float)) or not math.isfinite(te) or te <= 0:
        raise InputError(path, f"EchoTime {te!r} in the sidecar is not a positive number")
    if te > 1.0:
        raise InputError(path, f"EchoTime {te} looks like milliseconds; BIDS requires seconds")
    return float(te)


def _field_strength(sidecar: dict[str, Any], path: Path, override: float | None) -> float:
    if override is not None:
        b0 = float(override)
        origin = "given on the command line"
    else:
        b0 = sidecar.get("MagneticFieldStrength")
        origin = "MagneticFieldStrength in the sidecar"
        if b0 is None:
            raise InputError(path, "sidecar has no MagneticFieldStrength; give --field-strength")
    if not isinstance(b0, (int, float)) or not (_FIELD_RANGE_T[0] <= b0 <= _FIELD_RANGE_T[1]):
        raise InputError(path, f"field strength {b0!r} T ({origin}) is outside "
                         f"{_FIELD_RANGE_T[0]}-{_FIELD_RANGE_T[1]} T")
    return float(b0)


def _same_grid_as(grid: tuple[tuple[int, ...], np.ndarray] | None, path: Path,
                  shape: tuple[int, ...], affine: np.ndarray, first: Path
                  ) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid (shape, affine) of a series' first image; later images must match it
    (affines to 1e-3 mm)."""
    if grid is None:
        return shape, affine
    if shape != grid[0]:
        raise InputError(path, f"shape {shape} differs from {grid[0]} of {first}")
    if not np.allclose(affine, grid[1], atol=1e-3):
        raise InputError(path, f"affine differs from that of {first}")
    return grid


def _read_megre_echo(ef: EchoFiles, grid: tuple[tuple[int, ...], np.ndarray] | None,
                     first: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                           tuple[tuple[int, ...], np.ndarray],
                                           dict[str, Any], dict[str, Any]]:
    """Magnitude, scaled and raw phase, the series grid and both sidecars of one echo."""
    mag, _, aff_m = _load_image(ef.magnitude)
    ph_scaled, ph_raw, aff_p = _load_image(ef.phase)
    for path, arr, aff in ((ef.magnitude, mag, aff_m), (ef.phase, ph_scaled, aff_p)):
        grid = _same_grid_as(grid, path, arr.shape, aff, first)
    assert grid is not None
    return mag, ph_scaled, ph_raw, grid, read_sidecar(ef.magnitude), read_sidecar(ef.phase)


def _megre_echo_time(ef: EchoFiles, side_m: dict[str, Any], side_p: dict[str, Any]) -> float:
    """Echo time [s] of one echo from its sidecars (magnitude and phase must agree)."""
    te_m, te_p = _echo_time(side_m, ef.magnitude), _echo_time(side_p, ef.phase)
    if te_m is not None and te_p is not None and abs(te_m - te_p) > 1e-6:
        raise InputError(ef.phase, f"EchoTime {te_p} differs from the magnitude's {te_m}")
    te = te_m if te_m is not None else te_p
    if te is None:
        raise InputError(ef.magnitude, "no EchoTime in the JSON sidecar; give the echo "
                         "times with --echo-times")
    return te


def _megre_nonfinite(ef: EchoFiles, mag: np.ndarray, phase: np.ndarray,
                     fill_nonfinite: bool) -> np.ndarray | None:
    """Non-finite voxels of one echo (None when there is none); refuses them unless
    ``fill_nonfinite``, and refuses negative magnitudes."""
    nonfinite = ~np.isfinite(mag) | ~np.isfinite(phase)
    found = None
    if nonfinite.any():
        if not fill_nonfinite:
            where = ef.magnitude if (~np.isfinite(mag)).any() else ef.phase
            raise InputError(where, f"{int(nonfinite.sum())} non-finite (NaN/inf) voxels; "
                             "use --fill-nonfinite to zero them and exclude them from the mask")
        found = nonfinite
    if np.nanmin(np.where(np.isfinite(mag), mag, 0.0)) < 0:
        raise InputError(ef.magnitude, "magnitude has negative values (is this a phase, real "
                         "or imaginary image?)")
    return found


def _check_imaging_frequency(meta: dict[str, Any], first: Path, b0: float) -> None:
    """Refuse a sidecar whose ImagingFrequency [MHz] disagrees with its field strength
    ``b0`` [T] by more than 10 %."""
    freq = meta.get("ImagingFrequency")
    if isinstance(freq, (int, float)) and freq > 0:
        b0_from_freq = freq * 1e6 / GAMMA_BAR_HZ_PER_T
        if abs(b0_from_freq - b0) / b0 > 0.1:
            raise InputError(first, f"MagneticFieldStrength {b0} T disagrees with "
                             f"ImagingFrequency {freq} MHz ({b0_from_freq:.3f} T)")


def load_megre(
    files: MegreFileSet,
    *,
    subject: str,
    session: str,
    echo_times: Sequence[float] | None = None,
    field_strength: float | None = None,
    fill_nonfinite: bool = False,
    negate_phase: bool = False,
    phase_unwrapped: bool = False,
) -> MegreSeries:
    """Load one MEGRE series, checking geometry, echo times, phase range and finiteness.

    Parameters
    ----------
    files : MegreFileSet
        The series found by :func:`find_sessions`.
    subject, session : str
        BIDS labels (without ``sub-``/``ses-``).
    echo_times : sequence of float, optional
        Echo times in seconds overriding the sidecars (for data without them).
    field_strength : float, optional
        B0 in tesla overriding ``MagneticFieldStrength``.
    fill_nonfinite : bool
        Replace NaN/inf voxels by zero magnitude and phase instead of refusing the data;
        such voxels are recorded in ``metadata["NonFiniteVoxels"]`` and excluded from masks.
    negate_phase : bool
        Negate the phase (GE scanners store it with the opposite sign, which would make
        paramagnetic tissue negative); recorded in ``metadata["PhaseNegated"]``.
    phase_unwrapped : bool
        The phase images hold unwrapped phase in radians: kept as they are (no range
        check, wrapping or integer-code rescaling).

    Returns
    -------
    MegreSeries
        Echo-major float32 magnitude and phase (radians), TEs [s], B0 [T], geometry.

    Raises
    ------
    InputError
        Fewer than two echoes, missing/non-increasing echo times, mismatched shapes or
        affines, non-finite data, phase that cannot be brought to radians.
    """
    echoes = files.echoes
    first = echoes[0].magnitude
    if len(echoes) < 2:
        raise InputError(first, "only one echo found; QSM field mapping needs at least two "
                         "echoes (echo-1, echo-2, ...)")
    if echo_times is not None and len(echo_times) != len(echoes):
        raise InputError(first, f"{len(echo_times)} echo times given for {len(echoes)} echoes")

    mags: list[np.ndarray] = []
    phases: list[np.ndarray] = []
    tes: list[float] = []
    sources: list[str] = []
    conversions: set[str] = set()
    grid: tuple[tuple[int, ...], np.ndarray] | None = None
    bad_voxels = None
    meta0: dict[str, Any] = {}
    for n, ef in enumerate(echoes):
        for path in (ef.magnitude, ef.phase):
            sources.append(str(path))
        mag, ph_scaled, ph_raw, grid, side_m, side_p = _read_megre_echo(ef, grid, first)
        if n == 0:
            meta0 = dict(side_m or side_p)
        tes.append(float(echo_times[n]) if echo_times is not None
                   else _megre_echo_time(ef, side_m, side_p))
        nonfinite = _megre_nonfinite(ef, mag, ph_scaled, fill_nonfinite)
        if nonfinite is not None:
            bad_voxels = nonfinite if bad_voxels is None else (bad_voxels | nonfinite)
        if phase_unwrapped:
            phase, conversion = (np.asarray(ph_scaled, np.float32),
                                 "none (unwrapped radians kept as given)")
        else:
            phase, conversion = phase_to_radians(ph_scaled, ph_raw, ef.phase)
        conversions.add(conversion)
        mags.append(mag)
        phases.append(phase)

    te_arr = np.asarray(tes, dtype=np.float64)
    if np.any(np.diff(te_arr) <= 0):
        raise InputError(first, f"echo times {list(te_arr)} s are not strictly increasing with "
                         "the echo number")
    b0 = _field_strength(meta0, first, field_strength)
    if field_strength is None:
        _check_imaging_frequency(meta0, first, b0)

    magnitude = np.ascontiguousarray(np.stack(mags, axis=0), dtype=np.float32)
    phase_all = np.ascontiguousarray(np.stack(phases, axis=0), dtype=np.float32)
    meta = dict(meta0)
    meta["PhaseConversion"] = sorted(conversions)
    if negate_phase:
        phase_all = wrap_phase(-phase_all)
        meta["PhaseNegated"] = True
    if bad_voxels is not None:
        magnitude[:, bad_voxels] = 0.0
        phase_all[:, bad_voxels] = 0.0
        meta["NonFiniteVoxels"] = int(bad_voxels.sum())
    assert grid is not None
    ref_affine = grid[1]
    try:
        b0_dir = b0_direction_from_affine(ref_affine)
    except ValueError as exc:
        raise InputError(first, str(exc)) from None
    return MegreSeries(
        magnitude=magnitude,
        phase=phase_all,
        echo_times=te_arr,
        field_strength=b0,
        affine=ref_affine,
        voxel_size=voxel_size_from_affine(ref_affine),
        b0_direction=b0_dir,
        subject=subject,
        session=session,
        sources=sources,
        metadata=meta,
    )


# ------------------------------------------------------------------ multi-echo spin echo
def find_mese_series(session_dir: str | Path) -> list[list[Path]]:
    """Find the ``*_echo-<K>_MESE.nii[.gz]`` series of a session folder.

    Parameters
    ----------
    session_dir : path
        ``sub-XX`` or ``sub-XX/ses-YY`` folder (the files are in its ``anat/``).

    Returns
    -------
    list of list of Path
        One list of files per series (grouped by their other BIDS entities), ordered by
        echo number; empty when there is none.
    """
    groups = _scan_echo_files(Path(session_dir), "MESE")
    return [[echoes[k][None] for k in sorted(echoes)] for echoes in groups.values()]


def load_mese(
    files: Sequence[Path],
    *,
    subject: str,
    session: str,
    echo_times: Sequence[float] | None = None,
    refocusing_angle: float | None = None,
) -> MeseSeries:
    """Load one MESE series for the EPG T2 fit.

    Parameters
    ----------
    files : sequence of Path
        One 3-D NIfTI per echo, in echo order (from :func:`find_mese_series`).
    subject, session : str
        BIDS labels without prefix.
    echo_times : sequence of float, optional
        Echo times [s] overriding the sidecars' ``EchoTime``.
    refocusing_angle : float, optional
        Nominal refocusing angle [deg] overriding the sidecar's ``RefocusingFlipAngle``.

    Returns
    -------
    MeseSeries

    Raises
    ------
    InputError
        Fewer than 3 echoes, missing echo times (the EPG needs the echo spacing), echo
        times that are not k·ΔTE, missing refocusing angle, mismatched geometry,
        non-finite or negative magnitudes.
    """
    files = [Path(f) for f in files]
    if not files:
        raise InputError(".", "no MESE files given")
    first = files[0]
    if len(files) < 3:
        raise InputError(first, f"{len(files)} MESE echoes found; the T2 fit needs at least 3")
    if echo_times is not None and len(echo_times) != len(files):
        raise InputError(first, f"{len(echo_times)} echo times given for {len(files)} echoes")
    mags, tes = [], []
    grid: tuple[tuple[int, ...], np.ndarray] | None = None
    meta0: dict[str, Any] = {}
    for n, path in enumerate(files):
        mag, _, aff = _load_image(path)
        grid = _same_grid_as(grid, path, mag.shape, aff, first)
        side = read_sidecar(path)
        if n == 0:
            meta0 = dict(side)
        te = float(echo_times[n]) if echo_times is not None else _echo_time(side, path)
        if te is None:
            raise InputError(path, "no EchoTime in the JSON sidecar: the EPG fit needs the echo "
                             "spacing; give the echo times explicitly")
        tes.append(te)
        if not np.all(np.isfinite(mag)):
            raise InputError(path, f"{int((~np.isfinite(mag)).sum())} non-finite voxels")
        if mag.min() < 0:
            raise InputError(path, "magnitude has negative values")
        mags.append(mag)
    te_arr = np.asarray(tes, dtype=np.float64)
    spacing = float(te_arr[0])
    expected = spacing * np.arange(1, len(files) + 1)
    if not (spacing > 0 and np.allclose(te_arr, expected, rtol=0.01, atol=1e-5)):
        raise InputError(first, f"echo times {te_arr.tolist()} s are not k·ΔTE (k = 1, 2, …): "
                         "the CPMG model needs equally spaced echoes starting at ΔTE")
    angle = refocusing_angle if refocusing_angle is not None else meta0.get(
        "RefocusingFlipAngle")
    if not isinstance(angle, (int, float)) or not (0 < float(angle) <= 180):
        raise InputError(first, f"refocusing flip angle {angle!r} missing or outside (0, 180] "
                         "degrees; add RefocusingFlipAngle to the sidecar or give it")
    assert grid is not None
    ref_affine = grid[1]
    return MeseSeries(
        magnitude=np.ascontiguousarray(np.stack(mags), dtype=np.float32),
        echo_times=te_arr, echo_spacing=spacing, refocusing_angle=float(angle),
        affine=ref_affine, voxel_size=voxel_size_from_affine(ref_affine),
        subject=subject, session=session, sources=[str(f) for f in files], metadata=meta0)

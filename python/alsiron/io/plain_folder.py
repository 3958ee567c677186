"""Classification of a folder of NIfTI + JSON sidecars (as dcm2niix writes them, any file
names) into the series alsiron uses: MEGRE magnitude/phase per echo, MESE, T1w.

What a series is comes from its sidecars only: ``ImageType`` (M/MAGNITUDE, P/PHASE),
``EchoNumber``, ``EchoTime``, ``ScanningSequence`` (GR, SE, IR, EP) and ``SeriesNumber``;
``SeriesDescription``/``ProtocolName`` serve only as a hint for single-echo T1w scans and
to name a series in messages.  Magnitude and phase are paired by echo.  Series that are
plainly something else (localisers, EPI, derived images, single-echo scans) are skipped
with a notice; a series that looks like a target but is inconsistent (a missing echo,
phase without magnitude, two images for one echo) is refused with a one-line message
naming it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib

from alsiron.errors import InputError
from alsiron.io.bids import read_json_sidecar

log = logging.getLogger("alsiron")

_NIFTI_RE = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$")
#: Single-echo gradient-echo scans whose description says T1-weighted.
_T1_HINT = re.compile(r"t1|mprage|mp-rage|mp2rage|bravo|tfe|spgr|fspgr|vibe", re.IGNORECASE)


@dataclass
class Image:
    """One NIfTI image and its sidecar."""

    path: Path
    sidecar: Path
    meta: dict[str, Any]
    shape: tuple[int, ...]

    @property
    def series(self) -> str:
        """Series key: ``SeriesNumber`` when the sidecar has it, else the description."""
        number = self.meta.get("SeriesNumber")
        if number is not None:
            return str(number)
        return str(self.meta.get("SeriesDescription") or self.meta.get("ProtocolName")
                   or self.path.name)

    @property
    def name(self) -> str:
        """How messages name the series: number and description."""
        desc = self.meta.get("SeriesDescription") or self.meta.get("ProtocolName") or ""
        number = self.meta.get("SeriesNumber")
        head = f"series {number}" if number is not None else f"series of {self.path.name}"
        return f"{head} '{desc}'" if desc else head

    @property
    def image_type(self) -> set[str]:
        """Upper-case ``ImageType`` tokens."""
        value = self.meta.get("ImageType") or []
        if isinstance(value, str):
            value = re.split(r"[\\/]", value)
        return {str(v).strip().upper() for v in value}

    @property
    def part(self) -> str | None:
        """``mag``, ``phase``, ``real``, ``imag`` or None (unknown)."""
        tokens = self.image_type
        if tokens & {"P", "PHASE"}:
            return "phase"
        if tokens & {"R", "REAL"}:
            return "real"
        if tokens & {"I", "IMAGINARY"}:
            return "imag"
        if tokens & {"M", "MAGNITUDE"}:
            return "mag"
        return None

    @property
    def sequence(self) -> set[str]:
        """``ScanningSequence`` tokens (GR, SE, IR, EP, RM)."""
        value = self.meta.get("ScanningSequence") or ""
        if isinstance(value, list):
            value = "\\".join(str(v) for v in value)
        return {t.strip().upper() for t in re.split(r"[\\/_ ,]+", str(value)) if t.strip()}

    @property
    def echo(self) -> int | None:
        """``EchoNumber`` (None when absent)."""
        value = self.meta.get("EchoNumber")
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def echo_time(self) -> float | None:
        """``EchoTime`` [s] (None when absent)."""
        value = self.meta.get("EchoTime")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class MegreGroup:
    """One multi-echo GRE acquisition: (echo number, magnitude, phase) in echo order."""

    name: str
    echoes: list[tuple[int, Image, Image]]


@dataclass
class ClassifiedFolder:
    """What a folder of NIfTI + JSON holds, classified.

    Attributes
    ----------
    megre : list of MegreGroup
    mese : list of list of (echo, Image)
        Magnitude MESE series in echo order.
    t1w : list of Image
    skipped : list of str
        One line per series that is not used (why).
    """

    megre: list[MegreGroup] = field(default_factory=list)
    mese: list[list[tuple[int, Image]]] = field(default_factory=list)
    t1w: list[Image] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_images(folder: Path) -> list[Image]:
    """Every ``*.nii[.gz]`` with a ``.json`` sidecar in ``folder`` (not recursive).

    Raises
    ------
    InputError
        An image without a sidecar (nothing can say what it is), or an unreadable one.
    """
    images = []
    for path in sorted(folder.iterdir()):
        m = _NIFTI_RE.match(path.name)
        if m is None or not path.is_file():
            continue
        side = path.with_name(m["stem"] + ".json")
        if not side.is_file():
            raise InputError(path, "NIfTI image without a JSON sidecar: its echo time and "
                             "kind (magnitude/phase) are unknown")
        try:
            shape = tuple(int(n) for n in nib.load(str(path)).shape)
        except Exception as exc:  # nibabel raises many types for corrupt files
            raise InputError(path, f"cannot read NIfTI image ({exc})") from None
        images.append(Image(path=path, sidecar=side, meta=read_json_sidecar(side),
                            shape=shape))
    return images


def _series_kind(images: list[Image]) -> str | None:
    """'megre', 'mese', 't1w' or None (not used) for the images of one series."""
    first = images[0]
    seq = set().union(*(im.sequence for im in images))
    echoes = {im.echo for im in images if im.echo is not None}
    multi = len(echoes) > 1 or len({im.echo_time for im in images
                                    if im.echo_time is not None}) > 1
    hint = " ".join(str(first.meta.get(k) or "") for k in ("SeriesDescription",
                                                             "ProtocolName"))
    if "EP" in seq:
        return None
    if "SE" in seq and "GR" not in seq:
        return "mese" if multi and "IR" not in seq else None
    if "GR" in seq or not seq:
        if multi and "IR" not in seq:
            return "megre"
        if not multi and ("IR" in seq or _T1_HINT.search(hint)):
            return "t1w"
    return None


def _by_echo(images: list[Image], name: str) -> dict[int, Image]:
    """Images of one part of one series keyed by echo number (1 when single-echo).

    Raises
    ------
    InputError
        Two images for one echo, or echo numbers with a gap.
    """
    out: dict[int, Image] = {}
    for im in images:
        k = im.echo if im.echo is not None else 1
        if k in out:
            raise InputError(im.path, f"{name}: two images for echo {k} "
                             f"({out[k].path.name}, {im.path.name})")
        out[k] = im
    expected = list(range(1, max(out) + 1))
    if sorted(out) != expected:
        missing = sorted(set(expected) - set(out))
        raise InputError(images[0].path, f"{name}: echo {', '.join(map(str, missing))} "
                         f"missing (echoes {', '.join(map(str, sorted(out)))} found)")
    return out


def _pair_megre(mags: list[tuple[str, dict[int, Image]]],
                phases: list[tuple[str, dict[int, Image]]]) -> tuple[list[MegreGroup],
                                                                     list[str]]:
    """Pair phase series with magnitude series: same series, else the same echo times and
    grid (separate Siemens series), nearest series number first."""
    groups: list[MegreGroup] = []
    unpaired = list(mags)
    for key, ph in phases:
        first = ph[min(ph)]

        def matches(entry: tuple[str, dict[int, Image]], ph: dict[int, Image] = ph) -> bool:
            mag = entry[1]
            return (sorted(mag) == sorted(ph) and mag[1].shape == ph[1].shape
                    and all(_same_te(mag[k], ph[k]) for k in mag))

        same = [e for e in unpaired if e[0] == key]
        candidates = same or [e for e in unpaired if matches(e)]
        if not candidates:
            if same or any(e[0] == key for e in mags):
                raise InputError(first.path, f"{first.name}: magnitude and phase echoes "
                                 "differ")
            raise InputError(first.path, f"{first.name}: phase without a magnitude series "
                             "of the same echoes")
        candidates.sort(key=lambda e: abs(_number(e[0]) - _number(key)))
        chosen = candidates[0]
        mag = chosen[1]
        if sorted(mag) != sorted(ph):
            raise InputError(first.path, f"{first.name}: phase echoes "
                             f"{sorted(ph)} but magnitude echoes {sorted(mag)}")
        for k in mag:
            if not _same_te(mag[k], ph[k]):
                raise InputError(ph[k].path, f"{first.name}: echo {k} EchoTime "
                                 f"{ph[k].echo_time} differs from the magnitude's "
                                 f"{mag[k].echo_time}")
            if mag[k].shape != ph[k].shape:
                raise InputError(ph[k].path, f"{first.name}: echo {k} shape {ph[k].shape} "
                                 f"differs from the magnitude's {mag[k].shape}")
        unpaired.remove(chosen)
        groups.append(MegreGroup(name=mag[1].name,
                                 echoes=[(k, mag[k], ph[k]) for k in sorted(mag)]))
    skipped = [f"{m[1].name}: multi-echo GRE magnitude without phase (not used)"
               for _, m in unpaired]
    return groups, skipped


def _same_te(a: Image, b: Image) -> bool:
    return (a.echo_time is None or b.echo_time is None
            or abs(a.echo_time - b.echo_time) <= 1e-6)


def _number(key: str) -> float:
    try:
        return float(key)
    except ValueError:
        return math.inf


def classify_images(images: Iterable[Image], folder: Path) -> ClassifiedFolder:
    """Sort images into MEGRE pairs, MESE and T1w (see the module docstring).

    Raises
    ------
    InputError
        A missing echo, phase without magnitude, echoes of magnitude and phase that
        differ, two images for one echo, a multi-echo GRE image whose sidecar says
        neither magnitude nor phase, or nothing usable at all.
    """
    by_series: dict[str, list[Image]] = {}
    for im in images:
        by_series.setdefault(im.series, []).append(im)
    result = ClassifiedFolder()
    mags: list[tuple[str, dict[int, Image]]] = []
    phases: list[tuple[str, dict[int, Image]]] = []
    for key, members in sorted(by_series.items(), key=lambda kv: _number(kv[0])):
        name = members[0].name
        if any(len(im.shape) > 3 and im.shape[3] > 1 for im in members):
            result.skipped.append(f"{name}: 4-D image (not a per-echo volume)")
            continue
        kind = _series_kind(members)
        if kind is None:
            result.skipped.append(f"{name}: not MEGRE, MESE or T1w")
            continue
        parts: dict[str | None, list[Image]] = {}
        for im in members:
            parts.setdefault(im.part, []).append(im)
        if kind == "megre" and None in parts:
            raise InputError(parts[None][0].path, f"{name}: multi-echo GRE image whose "
                             "sidecar ImageType says neither magnitude (M) nor phase (P)")
        for other in ("real", "imag"):
            if other in parts:
                result.skipped.append(f"{name}: {other} part images (not used)")
        if kind == "megre":
            if "mag" in parts:
                mags.append((key, _by_echo(parts["mag"], name)))
            if "phase" in parts:
                phases.append((key, _by_echo(parts["phase"], name)))
        elif kind == "mese":
            mag = parts.get("mag") or parts.get(None)
            if not mag:
                result.skipped.append(f"{name}: multi-echo spin echo without magnitude")
                continue
            by_echo = _by_echo(mag, name)
            result.mese.append([(k, by_echo[k]) for k in sorted(by_echo)])
        else:
            t1 = parts.get("mag") or parts.get(None)
            if t1:
                result.t1w.append(t1[0])
    result.megre, skipped = _pair_megre(mags, phases)
    result.skipped.extend(skipped)
    if not (result.megre or result.mese or result.t1w):
        raise InputError(folder, "no MEGRE, MESE or T1w series found"
                         + (f" ({'; '.join(result.skipped)})" if result.skipped else ""))
    return result


def classify_folder(folder: Path) -> ClassifiedFolder:
    """Read and classify a folder of NIfTI + JSON files (:func:`classify_images`)."""
    images = read_images(folder)
    if not images:
        raise InputError(folder, "no NIfTI images with JSON sidecars found")
    return classify_images(images, folder)

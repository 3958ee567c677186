"""Vendor phase conventions: bring a converted phase image to radians in (−π, π] with the
sign convention alsiron uses (paramagnetic tissue positive after the chain).

- Siemens: integers stored 0..4095 with ``RescaleSlope 2``, ``RescaleIntercept −4096``
  (dcm2niix keeps them as NIfTI ``scl_slope``/``scl_inter``), so the scaled values are
  −4096..4094 ↔ [−π, π): handled by the generic integer-code rule of
  :func:`alsiron.io.bids.phase_to_radians`.
- GE: phase stored in milliradians (−3142..3142, or radians when already scaled) with
  the opposite sign (left-handed phase): divided by 1000 when in milliradians, then negated.
- Philips: the display value ``DV = PV·RS + RI`` (``PhilipsRescaleSlope``/
  ``PhilipsRescaleIntercept`` in the dcm2niix sidecar) is the phase in milliradians
  (``RescaleType mrad``) or radians; dcm2niix's default "precise" scaling divides it by
  ``RS·SS`` (the private scale slope), which for phase is only approximately 1000, so the
  display value is rebuilt from the stored integers and the sidecar's RS/RI.
- Anything else: :func:`alsiron.io.bids.phase_to_radians` (radians, [0, 2π), integer
  codes), or a one-line refusal naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from alsiron.errors import InputError
from alsiron.io.bids import phase_to_radians
from alsiron.volume import wrap_phase

#: Tolerance on ±π (and ±1000π for milliradians) when recognising units.
_TOL = 0.01


def vendor(meta: dict[str, Any]) -> str:
    """``siemens``, ``ge``, ``philips`` or ``other`` from the sidecar's Manufacturer."""
    name = str(meta.get("Manufacturer") or "").lower()
    if "siemens" in name:
        return "siemens"
    if name.startswith("ge") or "general electric" in name:
        return "ge"
    if "philips" in name:
        return "philips"
    return "other"


def _units(values: np.ndarray, path: Path) -> tuple[np.ndarray, str] | None:
    """Radians from values that are radians or milliradians; None for neither."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError(path, "phase image has no finite values")
    peak = float(np.max(np.abs(finite)))
    if peak <= math.pi * (1 + _TOL):
        return values.astype(np.float64), "radians"
    if peak <= 1000 * math.pi * (1 + _TOL) and peak > 100:
        return values.astype(np.float64) / 1000.0, "milliradians / 1000"
    return None


def phase_radians(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray, str, bool]:
    """The phase of a converted image in radians (−π, π], vendor conventions applied.

    Parameters
    ----------
    path : Path
        NIfTI phase image (as dcm2niix wrote it).
    meta : dict
        Its sidecar (``Manufacturer``, Philips scaling keys).

    Returns
    -------
    phase : ndarray, float32
        Radians in (−π, π], the image's shape.
    conversion : str
        What was done, for the sidecar (``PhaseConversion``).
    negated : bool
        True when the vendor's sign was flipped (GE).

    Raises
    ------
    InputError
        Values that fit no known convention (the range found is named).
    """
    img = nib.load(str(path))
    scaled = np.asarray(img.get_fdata(dtype=np.float64))
    raw = np.asarray(img.dataobj.get_unscaled(), dtype=np.float64)
    who = vendor(meta)
    if who == "ge":
        got = _units(scaled, path) or _units(raw, path)
        if got is None:
            lo, hi = float(np.nanmin(scaled)), float(np.nanmax(scaled))
            raise InputError(path, f"GE phase spans [{lo:.4g}, {hi:.4g}]: neither radians nor "
                             "milliradians")
        values, how = got
        return wrap_phase(-values), f"GE: {how}, sign negated (GE phase is left-handed)", True
    if who == "philips":
        rs, ri = meta.get("PhilipsRescaleSlope"), meta.get("PhilipsRescaleIntercept")
        if isinstance(rs, (int, float)) and isinstance(ri, (int, float)) and rs != 0:
            got = _units(raw * float(rs) + float(ri), path)
            if got is not None:
                return wrap_phase(got[0]), f"Philips: display value PV*RS+RI in {got[1]}", False
        got = _units(scaled, path)
        if got is not None:
            return wrap_phase(got[0]), f"Philips: {got[1]}", False
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    scaled_flag = (slope not in (None, 1.0)) or (inter not in (None, 0.0))
    phase, how = phase_to_radians(scaled.astype(np.float32),
                                  raw.astype(np.float32) if scaled_flag else None, path)
    return phase, how, False

"""Validation of the arrays and geometry every numerical stage takes: 3-D volumes,
masks, weights, voxel sizes [mm], B0 directions and iterative solvers' caps and
tolerances (one check of each, shared by all stages)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from alsiron.errors import InvalidInputError

logger = logging.getLogger("alsiron")


def as_voxel_size(value: float | Sequence[float], name: str = "voxel_size", *,
                  one_for_all: bool = False, message: str | None = None
                  ) -> tuple[float, float, float]:
    """The one voxel-size check: three finite, positive edge lengths [mm].

    Parameters
    ----------
    value : float or 3 floats
        Voxel edges [mm] along the array axes (any array-like that flattens to three).
    name : str
        Argument named in the error message.
    one_for_all : bool
        Accept a single number for isotropic voxels.
    message : str, optional
        Error message for any invalid value, for callers whose wording users already
        see (default: "… must be three finite numbers" / "… must be positive (mm)").

    Raises
    ------
    ValueError
        Not three (or, with ``one_for_all``, one) finite numbers, or one of them <= 0.
    """
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if one_for_all and arr.shape == (1,):
        arr = np.repeat(arr, 3)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InvalidInputError(message or f"{name} must be three finite numbers, got {value!r}")
    if np.any(arr <= 0):
        raise InvalidInputError(message or f"{name} must be positive (mm), got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def as_vec3(value: Sequence[float], name: str, *, positive: bool) -> tuple[float, float, float]:
    """Three finite numbers: a voxel size [mm] (``positive``, :func:`as_voxel_size`) or a
    non-zero direction vector."""
    if positive:
        return as_voxel_size(value, name)
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} must be three finite numbers, got {value!r}")
    if not np.any(arr != 0):
        raise InvalidInputError(f"{name} must be a non-zero vector, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def as_volume(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise InvalidInputError(f"{name} must be a 3-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidInputError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InvalidInputError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise InvalidInputError(
            f"{name} has {bad} non-finite voxels (NaN/inf); set them to 0 or exclude them "
            "from the mask first"
        )
    return out


def as_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise InvalidInputError(f"{name} has shape {arr.shape}, expected {shape} (same grid as "
                                "the field)")
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise InvalidInputError(f"{name} must be boolean or numeric, got dtype {arr.dtype}")
    if arr.dtype == bool and arr.flags.c_contiguous:
        # Already 0/1 bytes: a read-only uint8 view instead of two full-size copies
        # (10 ms at 256x256x176, a tenth of a TKD call).
        out = arr.view(np.uint8)
        out.flags.writeable = False
    else:
        out = np.ascontiguousarray(arr != 0, dtype=np.uint8)
    if not out.any():
        raise InvalidInputError(f"{name} is empty: no voxel inside")
    return out


def as_field_inputs(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
                    name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """The inputs every field stage (background removal, dipole inversion) starts from.

    Parameters
    ----------
    field : ndarray, shape (X, Y, Z)
        A field [ppm] (:func:`as_volume`: finite, real), named ``name`` in errors.
    mask : ndarray, shape (X, Y, Z)
        Where the field is valid (:func:`as_mask`: same grid, not empty).
    voxel_size : 3 floats
        Voxel edges [mm] (:func:`as_voxel_size`).

    Returns
    -------
    field : ndarray, float32, C-contiguous
    mask : ndarray, uint8 (0/1)
    voxel_size : (float, float, float)
        Checked in this order, so the first bad argument is the one reported.
    """
    volume = as_volume(field, name)
    return volume, as_mask(mask, volume.shape), as_voxel_size(voxel_size)


def as_weight(weight: np.ndarray, shape: tuple[int, ...], name: str = "weight") -> np.ndarray:
    """A per-voxel data weight (unitless, >= 0) on the field's grid, as float32.

    Raises
    ------
    InvalidInputError
        Not a finite real 3-D array (:func:`as_volume`), another shape than ``shape``, or a
        negative value.
    """
    w = as_volume(weight, name)
    if w.shape != shape:
        raise InvalidInputError(f"{name} has shape {w.shape}, expected {shape}")
    if np.any(w < 0):
        raise InvalidInputError(f"{name} must be non-negative (>= 0 everywhere)")
    return w


def as_iterations(value: int, name: str = "max_iter") -> int:
    """An iterative solver's iteration cap: a whole number >= 1 (a bool, a float or 0 is
    refused, so that 2.5 is not silently run as 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def as_tolerance(value: float, name: str = "tol") -> float:
    """An iterative solver's stopping tolerance (relative, unitless): finite and >= 0
    (0 runs to the iteration cap)."""
    tol = float(value)
    if not (np.isfinite(tol) and tol >= 0.0):
        raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
    return tol

"""Image geometry shared by every stage: voxel sizes from affines, world coordinates,
same-grid tests and resampling of a 3-D array onto another grid through the affines.

Affines are NIfTI voxel-to-world transforms (4 x 4, RAS+ millimetres); arrays are
(X, Y, Z) on their grid.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = ["NAN_POLICIES", "resample_to_grid", "same_grid", "vox2vox", "voxel_size_from_affine",
           "world_coordinates"]

#: How :func:`resample_to_grid` treats NaN source voxels: ``propagate`` interpolates
#: them like any value (a NaN spreads to every target voxel it touches); ``ignore``
#: leaves them out of the interpolation weights (NaN only where less than half of a
#: target voxel's weight falls on finite source voxels, or outside the source).
NAN_POLICIES = ("propagate", "ignore")


def voxel_size_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths in mm along the array axes (column norms of the affine)."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def world_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World (RAS+, mm) coordinates of every voxel centre, float32, shape (3, X, Y, Z)."""
    idx = np.indices(tuple(shape[:3]), dtype=np.float32).reshape(3, -1)
    xyz = np.asarray(affine[:3, :3], np.float32) @ idx + np.asarray(affine[:3, 3],
                                                                    np.float32)[:, None]
    return xyz.reshape(3, *shape[:3])


def vox2vox(source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """Target voxel indices → source voxel indices (4 x 4), the matrix
    :func:`scipy.ndimage.affine_transform` takes."""
    return np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(target_affine, float)


def same_grid(shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...],
              affine_b: np.ndarray, atol: float = 1e-3) -> bool:
    """True when two grids have the same shape and (to ``atol`` mm) the same affine."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b,
                                                                      atol=atol)


def resample_to_grid(data: np.ndarray, source_affine: np.ndarray, target_shape: tuple[int, ...],
                     target_affine: np.ndarray, *, order: int = 1, cval: float = 0.0,
                     mode: str = "constant",
                     nan_policy: Literal["propagate", "ignore"] = "propagate",
                     grid_atol: float = 1e-3) -> np.ndarray:
    """Resample a 3-D array onto another grid through the two affines.

    Parameters
    ----------
    data : ndarray, (X', Y', Z')
    source_affine, target_affine : ndarray (4, 4)
        Voxel-to-world transforms (mm).
    target_shape : 3 ints
    order : int
        Spline order (0 nearest, 1 trilinear).
    cval : float
        Value outside the source field of view (``mode="constant"``).
    mode : str
        :func:`scipy.ndimage.affine_transform` boundary mode.
    nan_policy : {"propagate", "ignore"}
        See :data:`NAN_POLICIES`.  ``propagate`` interpolates in float32 and returns a
        copy of ``data`` unchanged on an identical grid (so label masks stay exact);
        ``ignore`` interpolates values and weights in float64 and always returns float32.
    grid_atol : float
        Affines equal to this many mm (with equal shapes) count as one grid: no
        interpolation.

    Returns
    -------
    ndarray, float32 (except a ``propagate`` copy on an identical grid)
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if same_grid(data.shape, source_affine, target_shape, target_affine, grid_atol):
        if nan_policy == "propagate":
            return np.array(data, copy=True)
        return np.asarray(data, dtype=np.float64).astype(np.float32)
    m = vox2vox(source_affine, target_affine)
    kwargs = {"matrix": m[:3, :3], "offset": m[:3, 3], "output_shape": tuple(target_shape[:3]),
              "order": order, "mode": mode}
    if nan_policy == "propagate":
        return ndimage.affine_transform(np.asarray(data, np.float32), cval=cval, **kwargs)
    data = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(data)
    values = ndimage.affine_transform(np.where(finite, data, 0.0), cval=cval, **kwargs)
    weight = ndimage.affine_transform(finite.astype(np.float64), cval=0.0, **kwargs)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(weight >= 0.5, values / weight, np.nan)
    return out.astype(np.float32)

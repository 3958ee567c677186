"""Dipole model: the unit dipole kernel in k-space and the field of a χ map.

Volumes are 3-D arrays on the acquisition grid in C order, voxel sizes in mm along
those axes, the B0 direction a vector in that voxel-index frame (from the NIfTI affine,
never assumed to be (0, 0, 1)); fields in ppm of B0, χ in ppm. The kernel is 0 at
k = 0, so χ is defined up to a constant (see :mod:`alsiron.qsm.reference`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from alsiron import _core
from alsiron.arrays import as_vec3, as_volume, as_voxel_size

logger = logging.getLogger("alsiron")


def dipole_kernel(
    shape: Sequence[int], *, voxel_size: Sequence[float], b0_dir: Sequence[float]
) -> np.ndarray:
    """Unit dipole kernel on the real-FFT half spectrum.

    D(k) = 1/3 − (k·b̂)²/|k|², D(0) = 0, with k = fftfreq/voxel size [cycles/mm].

    Parameters
    ----------
    shape : (int, int, int)
        Grid shape (nx, ny, nz).
    voxel_size : (float, float, float)
        Voxel size in mm along the three array axes.
    b0_dir : (float, float, float)
        B0 direction in voxel-index space (normalised internally).

    Returns
    -------
    ndarray, float32, shape (nx, ny, nz // 2 + 1)
        Same layout as ``numpy.fft.rfftn`` of a volume of ``shape``.
    """
    shp = tuple(int(n) for n in shape)
    if len(shp) != 3 or min(shp) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape!r}")
    return _core.dipole_kernel(
        shp, as_voxel_size(voxel_size),
        as_vec3(b0_dir, "b0_dir", positive=False)
    )


def forward_field(
    chi: np.ndarray, *, voxel_size: Sequence[float], b0_dir: Sequence[float]
) -> np.ndarray:
    """Field [ppm] of a susceptibility map [ppm]: F⁻¹{D·F{χ}} (periodic boundaries).

    Parameters
    ----------
    chi : ndarray, shape (X, Y, Z)
        Susceptibility in ppm.
    voxel_size, b0_dir
        As in :func:`dipole_kernel`.

    Returns
    -------
    ndarray, float32, shape (X, Y, Z)
        Relative field δB/B0 in ppm (zero mean).
    """
    return _core.forward_field(
        as_volume(chi, "chi"),
        as_voxel_size(voxel_size),
        as_vec3(b0_dir, "b0_dir", positive=False),
    )

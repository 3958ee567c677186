"""Plain typed objects that stages exchange in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def wrap_phase(phase: np.ndarray) -> np.ndarray:
    """Phase [rad] mapped onto (−π, π], the convention of :attr:`MegreSeries.phase`.

    Computed in the input's floating precision (float32 stays float32), returned as
    float32.
    """
    out = np.mod(np.asarray(phase) + math.pi, 2 * math.pi) - math.pi
    # mod maps +π to −π; the convention is (−π, π].
    out[out <= -math.pi] = math.pi
    return out.astype(np.float32, copy=False)


@dataclass
class Volume:
    """A 3-D map on a NIfTI grid.

    Attributes
    ----------
    data : ndarray, shape (X, Y, Z)
        Voxel values in ``units``; failed voxels are NaN.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS+, mm) transform of the input grid, kept unchanged.
    units : str
        Physical unit of ``data`` ("ppm", "1/s", "s", "arbitrary", "" for masks/labels).
    provenance : dict
        Algorithm names and parameters that made the map, written to the JSON sidecar.
    """

    data: np.ndarray
    affine: np.ndarray
    units: str
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class MegreSeries:
    """One multi-echo gradient-echo acquisition (magnitude and phase).

    Attributes
    ----------
    magnitude : ndarray, float32, shape (E, X, Y, Z), C-contiguous
        Echo-major magnitude (arbitrary units), echoes in increasing echo time.
    phase : ndarray, float32, shape (E, X, Y, Z), C-contiguous
        Phase in radians within (-pi, pi].
    echo_times : ndarray, float64, shape (E,)
        Echo times in seconds, strictly increasing.
    field_strength : float
        B0 in tesla.
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform shared by all echoes.
    voxel_size : tuple of 3 floats
        Voxel edge lengths in mm along the array axes (i, j, k).
    b0_direction : tuple of 3 floats
        Unit B0 direction expressed in voxel-index space (i, j, k), derived from the affine.
    subject, session : str
        BIDS labels without prefix ("01"); ``session`` is "" when the dataset has none.
    sources : list of str
        Input file paths (magnitude and phase of every echo).
    metadata : dict
        Sidecar of the first echo (acquisition parameters for the output sidecars).
    """

    magnitude: np.ndarray
    phase: np.ndarray
    echo_times: np.ndarray
    field_strength: float
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    b0_direction: tuple[float, float, float]
    subject: str
    session: str
    sources: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_echoes(self) -> int:
        """Number of echoes."""
        return int(self.echo_times.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return tuple(int(s) for s in self.magnitude.shape[1:])  # type: ignore[return-value]


@dataclass
class MeseSeries:
    """One multi-echo spin-echo (CPMG) acquisition (magnitude only).

    Attributes
    ----------
    magnitude : ndarray, float32, shape (E, X, Y, Z), C-contiguous
        Echo-major magnitude, echoes in increasing echo time.
    echo_times : ndarray, float64, shape (E,)
        Echo times in seconds: k·``echo_spacing`` for k = 1…E.
    echo_spacing : float
        Echo spacing in seconds.
    refocusing_angle : float
        Nominal refocusing flip angle in degrees.
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform shared by all echoes.
    voxel_size : tuple of 3 floats
        Voxel edge lengths in mm.
    subject, session : str
        BIDS labels without prefix.
    sources : list of str
        Input file paths.
    metadata : dict
        Sidecar of the first echo.
    """

    magnitude: np.ndarray
    echo_times: np.ndarray
    echo_spacing: float
    refocusing_angle: float
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    subject: str
    session: str
    sources: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

"""R2*/T2* relaxometry from multi-echo gradient-echo magnitude.

:func:`fit_r2star_loglinear` fits ``S(TE) = S0·exp(−R2*·TE)`` voxel-wise by log-linear
least squares, optionally weighted by ``S²`` (one step; markedly less biased at low SNR).
The Rust kernel reads echo-major memory ``[E][N]``, which both a C-ordered ``(E, X, Y, Z)``
stack and a Fortran-ordered nibabel ``(X, Y, Z, E)`` array already are: neither is copied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alsiron import _core
from alsiron.fieldmap import validate_echo_times

log = logging.getLogger("alsiron")

__all__ = ["R2STAR_STATUS", "R2starResult", "fit_r2star_loglinear"]

#: Meaning of the codes in :attr:`R2starResult.status`.
R2STAR_STATUS: dict[int, str] = {
    0: "ok",
    1: "magnitude zero, negative or non-finite in at least one echo",
    2: "degenerate fit (weight on a single echo) or non-finite result",
    3: "outside mask",
}


@dataclass(frozen=True)
class R2starResult:
    """Maps of :func:`fit_r2star_loglinear`, each of the volume shape (X, Y, Z).

    Attributes
    ----------
    r2star : ndarray, float32
        R2* [s⁻¹]; NaN where the fit failed (see ``status``). Negative values from noise
        are kept.
    t2star : ndarray, float32
        T2* = 1/R2* [s]; NaN where R2* ≤ 0 or the fit failed.
    s0 : ndarray, float32
        Signal at TE = 0 (magnitude units); NaN where the fit failed.
    status : ndarray, uint8
        Reason code per voxel, see :data:`R2STAR_STATUS`.
    weighted : bool
        Whether S²-weighted least squares was used.
    echo_times : tuple of float
        Echo times [s].
    """

    r2star: np.ndarray
    t2star: np.ndarray
    s0: np.ndarray
    status: np.ndarray
    weighted: bool
    echo_times: tuple[float, ...]


def _echo_major(magnitude: np.ndarray, n_echoes: int
                ) -> tuple[np.ndarray, tuple[int, ...], str]:
    """View ``magnitude`` as a C-contiguous float32 (E, N) array, copying only if needed.

    Accepts (E, X, Y, Z) when the first axis has ``n_echoes`` entries (and, if the last
    axis has too, the array is C-contiguous), else (X, Y, Z, E). Returns the (E, N) array,
    the volume shape and the order ("C" or "F") in which its N voxels run.
    """
    if magnitude.ndim < 2:
        raise ValueError(f"magnitude must have an echo axis, got shape {magnitude.shape}")
    if magnitude.shape[0] == n_echoes and (
        magnitude.shape[-1] != n_echoes or magnitude.flags.c_contiguous
    ):
        vol_shape, voxel_order = magnitude.shape[1:], "C"
        flat = magnitude.reshape(n_echoes, -1)  # a view when C-contiguous
    elif magnitude.shape[-1] == n_echoes:
        vol_shape, voxel_order = magnitude.shape[:-1], "F"
        # (X, Y, Z, E) in Fortran order is echo-major in memory: this is a C view of it.
        flat = magnitude.reshape(-1, n_echoes, order="F").T
    else:
        raise ValueError(
            f"magnitude shape {magnitude.shape} has no axis of {n_echoes} echoes "
            "(expected (E, X, Y, Z) or (X, Y, Z, E))")
    if flat.dtype != np.float32 or not flat.flags.c_contiguous:
        log.debug("R2* fit: copying magnitude %s %s to C-contiguous float32",
                  magnitude.dtype, magnitude.shape)
        flat = np.ascontiguousarray(flat, dtype=np.float32)
    return flat, vol_shape, voxel_order


def fit_r2star_loglinear(
    magnitude: np.ndarray,
    echo_times: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    weighted: bool = False,
) -> R2starResult:
    """Fit R2* and S0 voxel-wise by (optionally S²-weighted) log-linear least squares.

    Parameters
    ----------
    magnitude : ndarray, shape (E, X, Y, Z) or (X, Y, Z, E)
        Magnitude of E ≥ 2 echoes. A C-ordered (E, ...) stack or a Fortran-ordered
        (..., E) nibabel array is used without copying when it is float32. When both the
        first and last axes have E entries, C-ordered input is read as (E, ...) and
        anything else as (..., E).
    echo_times : sequence of float
        Echo times [s], strictly increasing.
    mask : ndarray of the volume shape, optional
        Voxels to fit (nonzero = inside); outside → NaN with status 3.
    weighted : bool
        Use weights ∝ S² (recommended at low SNR); default ordinary least squares.

    Returns
    -------
    R2starResult
        ``r2star`` [s⁻¹], ``t2star`` [s], ``s0``, ``status`` (see :data:`R2STAR_STATUS`).
    """
    magnitude = np.asarray(magnitude)
    if not np.issubdtype(magnitude.dtype, np.number) or np.iscomplexobj(magnitude):
        raise ValueError(f"magnitude must be real numbers, got dtype {magnitude.dtype}")
    n_echoes = np.asarray(echo_times).size
    tes = validate_echo_times(echo_times, n_echoes)
    flat, vol_shape, voxel_order = _echo_major(magnitude, n_echoes)
    mask_flat = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != vol_shape:
            raise ValueError(f"mask has shape {mask.shape}, expected {vol_shape}")
        mask_flat = np.ascontiguousarray((mask != 0).reshape(-1, order=voxel_order),
                                         dtype=np.uint8)
    r2, s0, status = _core.fit_r2star_loglinear(flat, list(tes), mask_flat, bool(weighted))
    r2 = r2.reshape(vol_shape, order=voxel_order)
    s0 = s0.reshape(vol_shape, order=voxel_order)
    status = status.reshape(vol_shape, order=voxel_order)
    with np.errstate(divide="ignore", invalid="ignore"):
        t2 = np.where(r2 > 0, 1.0 / r2, np.nan).astype(np.float32)
    return R2starResult(r2star=r2, t2star=t2, s0=s0, status=status, weighted=bool(weighted),
                        echo_times=tes)


"""Background-field removal: V-SHARP, PDF, iSMV and LBV, and the mask erosion that
belongs to them.

Every method takes the total field [ppm] in a brain mask and returns the local field
[ppm] in a (possibly smaller) mask; fields outside the mask are ignored. Heavy work
runs in the Rust core (float32, all cores, GIL released)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from alsiron import _core
from alsiron.arrays import (
    as_field_inputs,
    as_iterations,
    as_tolerance,
    as_vec3,
    as_voxel_size,
    as_weight,
)
from alsiron.errors import InvalidInputError

logger = logging.getLogger("alsiron")

#: Default truncation of the V-SHARP deconvolution kernel |1 − Ŝ|.
VSHARP_THRESHOLD = 0.05

#: Default PDF stopping tolerance on the relative CG residual (measured on the head phantom).
PDF_TOL = 3e-3

#: Default cap on PDF's CG iterations.
PDF_MAX_ITER = 100

#: Default zero padding (voxels per axis) of PDF's grid against wrap-around.
PDF_PAD_VOXELS = 16

#: Default iSMV tolerance on the change of the background field (Wen et al. 2014).
ISMV_TOL = 1e-3

#: Default cap on iSMV iterations (Wen et al. 2014).
ISMV_MAX_ITER = 500

#: Default LBV stopping tolerance on the relative CG residual.
LBV_TOL = 1e-4

#: Default cap on LBV's CG iterations.
LBV_MAX_ITER = 2000


def vsharp_default_radii(voxel_size: Sequence[float]) -> list[float]:
    """Default V-SHARP radii [mm]: 12 mm down to one (largest) voxel, one voxel apart."""
    return list(_core.vsharp_default_radii(as_voxel_size(voxel_size)))


def vsharp(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    radii_mm: Sequence[float] | None = None,
    threshold: float = VSHARP_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """V-SHARP background field removal.

    Each voxel takes f − S_r∗f from the largest sphere radius r that fits in the mask
    around it; the result is deconvolved with 1 − Ŝ of the largest radius, truncated
    where |1 − Ŝ| < ``threshold``. The grid is zero-padded to fast FFT sizes internally.

    Parameters
    ----------
    total_field : ndarray, shape (X, Y, Z)
        Unwrapped total field in ppm; values outside ``mask`` are ignored.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    voxel_size : (float, float, float)
        Voxel size in mm (spheres are round in mm, not in voxels).
    radii_mm : sequence of float, optional
        Sphere radii in mm; default :func:`vsharp_default_radii`.
    threshold : float
        Truncation of the deconvolution kernel, in (0, 1). Default 0.05.

    Returns
    -------
    local_field : ndarray, float32
        Local field in ppm, 0 outside ``eroded_mask``.
    eroded_mask : ndarray of bool
        ``mask`` eroded by the smallest sphere: where ``local_field`` is valid.

    References
    ----------
    Li W. et al., NeuroImage 55:1645 (2011); Wu B. et al., MRM 67:137 (2012).
    """
    field, m, vs = as_field_inputs(total_field, mask, voxel_size, "total_field")
    radii = vsharp_default_radii(vs) if radii_mm is None else [float(r) for r in radii_mm]
    if not radii or not all(np.isfinite(r) and r > 0 for r in radii):
        raise ValueError(f"radii_mm must be positive mm values, got {radii_mm!r}")
    if max(radii) < max(vs):
        raise InvalidInputError(f"the largest radius {max(radii)} mm is below the voxel size {vs}")
    if not (0.0 < float(threshold) < 1.0):
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    local, eroded = _core.vsharp(field, m, vs, radii, float(threshold))
    if not eroded.any():
        raise InvalidInputError(
            f"the mask is too thin for the V-SHARP radii {radii} mm: nothing survives erosion"
        )
    return local, eroded.astype(bool)


def pdf(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    weight: np.ndarray | None = None,
    pad_voxels: int | Sequence[int] = PDF_PAD_VOXELS,
    tol: float = PDF_TOL,
    max_iter: int = PDF_MAX_ITER,
    kernel: str = "kspace",
    source_smoothing: float = 0.0,
    source_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Projection onto dipole fields (PDF) background field removal.

    The background field is modelled as the field of susceptibility sources outside
    ``mask``; their susceptibility is fitted to the total field inside the mask by
    conjugate gradients on the (weighted) normal equations, and the local field is the
    remainder. The full dipole kernel is used, so ``b0_dir`` (oblique acquisitions) and
    anisotropic ``voxel_size`` enter as in the forward model. The grid is zero-padded by
    ``pad_voxels`` (then to fast FFT sizes) so that sources do not wrap around. The mask
    is not eroded.

    Parameters
    ----------
    total_field, mask
        As in :func:`vsharp`.
    voxel_size : (float, float, float)
        Voxel size in mm along the array axes.
    b0_dir : (float, float, float)
        B0 direction in voxel-index space (normalised internally).
    weight : ndarray, shape (X, Y, Z), optional
        Data reliability per voxel (e.g. echo-1 magnitude, or 1/σ of the field), ≥ 0,
        squared in the data term; None weighs every mask voxel equally.
    pad_voxels : int or (int, int, int)
        Zero padding added to each axis before rounding up to a fast FFT size. Default 16.
    tol : float
        Stop when the CG residual falls below ``tol`` times its initial norm. Default 1e-2.
    max_iter : int
        Maximum CG iterations. Default 100.
    kernel : {"kspace", "image"}
        Dipole discretisation: sampled in k-space (as the forward model) or the
        point-dipole field sampled in image space (no band-limit ringing).
    source_smoothing : float
        Weight λ [mm²] of a squared-gradient penalty λ‖∇χ_out‖² on the fitted background
        sources, taken only between neighbouring source voxels; 0 (default) is plain PDF.
        Background tissue is piecewise smooth, while sources that would mimic the field of
        cortex next to the mask edge must be rough, so the penalty removes less of it
        (``docs/qsm_anatomy.md``, "The anchor, continued").
    source_mask : ndarray of bool, shape (X, Y, Z), optional
        Where background sources may sit (besides the padding, which always may); voxels
        of ``mask`` never hold one. None (default): every voxel outside ``mask``. Voxels
        outside both hold neither data nor sources: before a single-step inversion, which
        estimates χ up to the brain's edge, the sources belong outside the brain, not in
        the rim between its edge and the eroded ``mask``, where they would take up the
        field of the cortex itself.

    Returns
    -------
    local_field : ndarray, float32
        Local field in ppm, 0 outside ``mask``.
    iterations : int
        CG iterations run.

    References
    ----------
    Liu T. et al., "A novel background field removal method for MRI using projection
    onto dipole fields", NMR Biomed 24:1129 (2011).
    """
    field, m, vs = as_field_inputs(total_field, mask, voxel_size, "total_field")
    b0 = as_vec3(b0_dir, "b0_dir", positive=False)
    w = None if weight is None else as_weight(weight, field.shape)
    if w is not None and not np.any(w[m != 0] > 0):
        raise InvalidInputError("weight is zero everywhere inside the mask")
    pads = np.broadcast_to(np.asarray(pad_voxels), (3,))
    if not np.issubdtype(pads.dtype, np.integer) or np.any(pads < 0) or np.any(pads > 4096):
        raise ValueError(f"pad_voxels must be integers in [0, 4096], got {pad_voxels!r}")
    if kernel not in ("kspace", "image"):
        raise ValueError(f"kernel must be 'kspace' or 'image', got {kernel!r}")
    if not (math.isfinite(source_smoothing) and source_smoothing >= 0.0):
        raise ValueError(f"source_smoothing must be a finite value >= 0 [mm²], "
                         f"got {source_smoothing!r}")
    sources = None
    if source_mask is not None:
        sources = np.ascontiguousarray(np.asarray(source_mask, dtype=bool), dtype=np.uint8)
        if sources.shape != field.shape:
            raise InvalidInputError(f"source_mask has shape {sources.shape}, "
                                    f"expected {field.shape}")
        if not np.any(sources & (m == 0)):
            raise InvalidInputError("source_mask has no voxel outside the mask")
    local, iterations = _core.pdf(field, m, w, vs, b0, tuple(int(p) for p in pads),
                                  as_tolerance(tol), as_iterations(max_iter),
                                  kernel, float(source_smoothing), sources)
    logger.debug("pdf: %d CG iterations", iterations)
    return local, int(iterations)


def ismv(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    radius_mm: float | None = None,
    tol: float = ISMV_TOL,
    max_iter: int = ISMV_MAX_ITER,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Iterative spherical mean value (iSMV) background field removal.

    Inside the mask eroded by a sphere of ``radius_mm`` the background field equals its
    own spherical mean; on the eroded rim it is taken to equal the total field (local
    field ≈ 0 there). The fixed point f_b = E·(S∗f_b) + (M − E)·f is found by iteration
    and the local field is E·(f − f_b). The grid is zero-padded to fast FFT sizes.

    Parameters
    ----------
    total_field, mask
        As in :func:`vsharp`.
    voxel_size : (float, float, float)
        Voxel size in mm (the sphere is round in mm).
    radius_mm : float, optional
        Sphere radius in mm; default two (largest) voxel edges, as Wen et al.
    tol : float
        Stop when the change of the background field per iteration falls below
        ``tol`` times the norm of the field in the eroded mask. Default 1e-3.
    max_iter : int
        Maximum iterations. Default 500.

    Returns
    -------
    local_field : ndarray, float32
        Local field in ppm, 0 outside ``eroded_mask``.
    eroded_mask : ndarray of bool
        ``mask`` eroded by the sphere: where ``local_field`` is valid.
    iterations : int
        Iterations run.

    References
    ----------
    Wen Y. et al., "An iterative spherical mean value method for background field
    removal in MRI", Magn Reson Med 72:1065 (2014).
    """
    field, m, vs = as_field_inputs(total_field, mask, voxel_size, "total_field")
    radius = 2.0 * max(vs) if radius_mm is None else float(radius_mm)
    if not (np.isfinite(radius) and radius >= max(vs)):
        raise InvalidInputError(f"radius_mm must be at least the largest voxel edge {max(vs)} mm, "
                                f"got {radius_mm!r}")
    local, eroded, iterations = _core.ismv(field, m, vs, radius, as_tolerance(tol),
                                           as_iterations(max_iter))
    logger.debug("ismv: %d iterations", iterations)
    return local, eroded.astype(bool), int(iterations)


def lbv(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    tol: float = LBV_TOL,
    max_iter: int = LBV_MAX_ITER,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Laplacian boundary value (LBV) background field removal.

    The background field is the harmonic function (7-point Laplacian with the voxel
    spacing) that equals the total field on the mask's boundary voxels — those with a
    6-neighbour outside the mask or the volume, where the local field is assumed to be 0.
    Solved by conjugate gradients from the total field as the starting guess.

    Parameters
    ----------
    total_field, mask
        As in :func:`vsharp`.
    voxel_size : (float, float, float)
        Voxel size in mm (the Laplacian's spacing).
    tol : float
        Stop when the CG residual falls below ``tol`` times the norm of the right-hand
        side. Default 1e-4.
    max_iter : int
        Maximum CG iterations. Default 2000.

    Returns
    -------
    local_field : ndarray, float32
        Local field in ppm, 0 outside ``interior_mask``.
    interior_mask : ndarray of bool
        ``mask`` without its boundary voxels (one-voxel erosion).
    iterations : int
        CG iterations run.

    References
    ----------
    Zhou D. et al., "Background field removal by solving the Laplacian boundary value
    problem", NMR Biomed 27:312 (2014).
    """
    field, m, vs = as_field_inputs(total_field, mask, voxel_size, "total_field")
    local, interior, iterations = _core.lbv(field, m, vs, as_tolerance(tol),
                                            as_iterations(max_iter))
    logger.debug("lbv: %d CG iterations", iterations)
    return local, interior.astype(bool), int(iterations)


#: Distances within this of the erosion depth count as equal to it [mm] (header rounding
#: of voxel sizes must not decide whether a voxel layer is removed).
_DEPTH_TOLERANCE_MM = 1e-3


def edge_distance_mm(mask: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Distance [mm] from each mask voxel's centre to the nearest centre of a voxel
    outside the mask (voxels beyond the array count as outside); 0 outside.

    Euclidean distance transform with the voxel edges as sampling, so anisotropic voxels
    are measured in mm, not in voxels.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    voxel_size : 3 floats
        Voxel edges along the array axes [mm].

    Returns
    -------
    ndarray of float64, shape (X, Y, Z)
        Distance in mm; the outermost voxels of the mask have one voxel edge.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {m.shape}")
    vs = as_voxel_size(voxel_size)
    out = np.zeros(m.shape, dtype=np.float64)
    if not m.any():
        return out
    # Only the mask's bounding box, padded by one outside layer: an outside voxel beyond
    # the box is never nearer than its projection onto that layer, so the distances are
    # exact, and the transform runs on the box instead of the whole field of view.
    box = ndimage.find_objects(m.astype(np.uint8))[0]
    padded = np.pad(m[box], 1, constant_values=False)
    out[box] = ndimage.distance_transform_edt(padded, sampling=vs)[1:-1, 1:-1, 1:-1]
    return out


def erode_mm(mask: np.ndarray, voxel_size: Sequence[float], depth_mm: float) -> np.ndarray:
    """Erode ``mask`` by a physical depth: drop every voxel whose centre lies within
    ``depth_mm`` of the centre of a voxel outside the mask.

    This is an erosion by a ball of radius ``depth_mm`` in mm (an ellipsoid in voxels
    when the voxels are anisotropic), so the same ``depth_mm`` removes the same tissue
    depth at any resolution. ``depth_mm`` below one voxel edge removes nothing; one
    voxel edge (isotropic voxels) removes the outer voxel layer, like a one-voxel
    6-connected erosion; two voxel edges is what two such erosions removed, plus the
    few voxels on the cube diagonal that they kept.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    voxel_size : 3 floats
        Voxel edges [mm].
    depth_mm : float
        Erosion depth [mm], >= 0 (0 returns the mask unchanged).

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)
    """
    depth = float(depth_mm)
    if not np.isfinite(depth) or depth < 0:
        raise ValueError(f"erosion depth must be a finite number of mm >= 0, got {depth_mm!r}")
    m = np.asarray(mask, dtype=bool)
    if depth == 0:
        return m.copy()
    # A voxel exactly depth_mm away (e.g. the 6-neighbour at one voxel edge) is removed
    # even when the header's voxel size is rounded a little above the nominal value.
    return edge_distance_mm(m, voxel_size) > depth + _DEPTH_TOLERANCE_MM

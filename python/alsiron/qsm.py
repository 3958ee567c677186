"""Quantitative susceptibility mapping: dipole model, background removal, inversion.

All functions take 3-D arrays on the acquisition grid in C order (axis 0, 1, 2 =
voxel index i, j, k), voxel sizes in mm along those axes and the B0 direction as a
vector in that voxel-index frame (derived from the NIfTI affine by the ingest stage;
it is never assumed to be (0, 0, 1)). Fields are in ppm of
B0 and susceptibilities in ppm. Heavy work runs in the Rust core (float32, all cores,
GIL released).

Conventions chosen here
-----------------------
- χ maps are 0 outside the mask (the convention of QSM toolboxes and of the 2024 QSM
  consensus outputs); :func:`reference_to_mean` keeps that.
- Fields outside the mask are ignored (set to 0) by every inversion.
- The dipole kernel is 0 at k = 0, so χ is defined up to a constant; reference it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from alsiron import _core

__all__ = [
    "ISMV_MAX_ITER",
    "ISMV_TOL",
    "LBV_MAX_ITER",
    "LBV_TOL",
    "PDF_MAX_ITER",
    "PDF_PAD_VOXELS",
    "PDF_TOL",
    "TKD_THRESHOLD",
    "TV_ALPHA",
    "TV_MU",
    "VSHARP_THRESHOLD",
    "BRAIN_MASK_METHODS",
    "brain_mask",
    "edge_distance_mm",
    "erode_mm",
    "dipole_kernel",
    "forward_field",
    "ismv",
    "lbv",
    "pdf",
    "reference_to_mean",
    "tkd",
    "tv_admm",
    "vsharp",
    "vsharp_default_radii",
]

logger = logging.getLogger("alsiron")

#: Default TKD truncation threshold on |D| (Wharton et al. 2010 used 0.19-0.2).
TKD_THRESHOLD = 0.19
#: Default TV weight α (field in ppm, gradients in ppm/mm), tuned on the test phantom.
TV_ALPHA = 7e-4
#: Default ADMM penalty μ, tuned on the test phantom.
TV_MU = 7e-2
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


# --------------------------------------------------------------------------- validation


def _vec3(value: Sequence[float], name: str, *, positive: bool) -> tuple[float, float, float]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be three finite numbers, got {value!r}")
    if positive and np.any(arr <= 0):
        raise ValueError(f"{name} must be positive (mm), got {value!r}")
    if not positive and not np.any(arr != 0):
        raise ValueError(f"{name} must be a non-zero vector, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _volume(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise ValueError(
            f"{name} has {bad} non-finite voxels (NaN/inf); set them to 0 or exclude them "
            "from the mask first"
        )
    return out


def _mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (same grid as the field)")
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be boolean or numeric, got dtype {arr.dtype}")
    if arr.dtype == bool and arr.flags.c_contiguous:
        # Already 0/1 bytes: a read-only uint8 view instead of two full-size copies
        # (10 ms at 256x256x176, a tenth of a TKD call).
        out = arr.view(np.uint8)
        out.flags.writeable = False
    else:
        out = np.ascontiguousarray(arr != 0, dtype=np.uint8)
    if not out.any():
        raise ValueError(f"{name} is empty: no voxel inside")
    return out


# --------------------------------------------------------------------------- kernels


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
        shp, _vec3(voxel_size, "voxel_size", positive=True), _vec3(b0_dir, "b0_dir", positive=False)
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
        _volume(chi, "chi"),
        _vec3(voxel_size, "voxel_size", positive=True),
        _vec3(b0_dir, "b0_dir", positive=False),
    )


def tkd(
    local_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    threshold: float = TKD_THRESHOLD,
) -> np.ndarray:
    """Truncated k-space division (TKD) dipole inversion.

    χ = F⁻¹{F{f·mask} · D⁺}, D⁺ = 1/D where |D| > t, sign(D)/t elsewhere, 0 at k = 0.

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local (background-removed) field in ppm.
    mask : ndarray of bool, shape (X, Y, Z)
        Region where the field is valid; the output is 0 outside it.
    voxel_size, b0_dir
        As in :func:`dipole_kernel`.
    threshold : float
        Truncation level t on |D|, in (0, 2/3]. Default 0.19.

    Returns
    -------
    ndarray, float32
        χ in ppm (not referenced; see :func:`reference_to_mean`).

    References
    ----------
    Shmueli K. et al., MRM 62:1510 (2009); Wharton S. et al., MRM 63:1292 (2010).
    """
    field = _volume(local_field, "local_field")
    m = _mask(mask, field.shape)
    if not (0.0 < float(threshold) <= 2.0 / 3.0):
        raise ValueError(f"threshold must be in (0, 2/3], got {threshold}")
    return _core.tkd(
        field,
        m,
        _vec3(voxel_size, "voxel_size", positive=True),
        _vec3(b0_dir, "b0_dir", positive=False),
        float(threshold),
    )


def tv_admm(
    local_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    alpha: float = TV_ALPHA,
    mu: float = TV_MU,
    max_iter: int = 100,
    tol: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """Total-variation regularised dipole inversion solved by ADMM (linear FANSI).

    Minimises ½‖D χ − f‖² + α‖∇χ‖₁ (periodic forward differences scaled by the voxel
    size) with the splitting z = ∇χ: each iteration is one k-space division (2 FFTs), a
    soft threshold at α/μ and a dual update. Interruptible with Ctrl-C.

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local field in ppm; values outside ``mask`` are ignored.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask; χ is 0 outside.
    voxel_size, b0_dir
        As in :func:`dipole_kernel`.
    alpha : float
        TV weight (ppm · mm/ppm). Default tuned on the alsiron test phantom.
    mu : float
        ADMM penalty; affects convergence speed, and the result at a finite iteration count.
    max_iter : int
        Iteration cap.
    tol : float
        Stop when ‖χₙ − χₙ₋₁‖/‖χₙ‖ < tol.
    progress : callable, optional
        Called as ``progress(iteration, max_iter)`` every few iterations; an exception
        it raises stops the solver and propagates.

    Returns
    -------
    chi : ndarray, float32
        χ in ppm (not referenced).
    n_iter : int
        Iterations run.

    References
    ----------
    Bilgic B. et al., MRM 72:1444 (2014); Milovic C. et al., MRM 80:814 (2018).
    """
    field = _volume(local_field, "local_field")
    m = _mask(mask, field.shape)
    if not (np.isfinite(alpha) and alpha >= 0 and np.isfinite(mu) and mu > 0):
        raise ValueError(f"need alpha >= 0 and mu > 0, got alpha={alpha}, mu={mu}")
    if int(max_iter) < 1 or not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"need max_iter >= 1 and tol >= 0, got {max_iter}, {tol}")
    chi, n_iter = _core.tv_admm(
        field,
        m,
        _vec3(voxel_size, "voxel_size", positive=True),
        _vec3(b0_dir, "b0_dir", positive=False),
        float(alpha),
        float(mu),
        int(max_iter),
        float(tol),
        progress,
    )
    logger.debug("tv_admm stopped after %d iterations", n_iter)
    return chi, int(n_iter)


def vsharp_default_radii(voxel_size: Sequence[float]) -> list[float]:
    """Default V-SHARP radii [mm]: 12 mm down to one (largest) voxel, one voxel apart."""
    return list(_core.vsharp_default_radii(_vec3(voxel_size, "voxel_size", positive=True)))


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
    field = _volume(total_field, "total_field")
    m = _mask(mask, field.shape)
    vs = _vec3(voxel_size, "voxel_size", positive=True)
    radii = vsharp_default_radii(vs) if radii_mm is None else [float(r) for r in radii_mm]
    if not radii or not all(np.isfinite(r) and r > 0 for r in radii):
        raise ValueError(f"radii_mm must be positive mm values, got {radii_mm!r}")
    if max(radii) < max(vs):
        raise ValueError(f"the largest radius {max(radii)} mm is below the voxel size {vs}")
    if not (0.0 < float(threshold) < 1.0):
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    local, eroded = _core.vsharp(field, m, vs, radii, float(threshold))
    if not eroded.any():
        raise ValueError(
            f"the mask is too thin for the V-SHARP radii {radii} mm: nothing survives erosion"
        )
    return local, eroded.astype(bool)


def _iterations(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _tolerance(value: float, name: str) -> float:
    tol = float(value)
    if not (np.isfinite(tol) and tol >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return tol


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
    total_field : ndarray, shape (X, Y, Z)
        Unwrapped total field in ppm; values outside ``mask`` are ignored.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain (tissue) mask.
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
    field = _volume(total_field, "total_field")
    m = _mask(mask, field.shape)
    vs = _vec3(voxel_size, "voxel_size", positive=True)
    b0 = _vec3(b0_dir, "b0_dir", positive=False)
    w = None
    if weight is not None:
        w = _volume(weight, "weight")
        if w.shape != field.shape:
            raise ValueError(f"weight has shape {w.shape}, expected {field.shape}")
        if np.any(w < 0):
            raise ValueError("weight must be >= 0 everywhere")
        if not np.any(w[m != 0] > 0):
            raise ValueError("weight is zero everywhere inside the mask")
    pads = np.broadcast_to(np.asarray(pad_voxels), (3,))
    if not np.issubdtype(pads.dtype, np.integer) or np.any(pads < 0) or np.any(pads > 4096):
        raise ValueError(f"pad_voxels must be integers in [0, 4096], got {pad_voxels!r}")
    if kernel not in ("kspace", "image"):
        raise ValueError(f"kernel must be 'kspace' or 'image', got {kernel!r}")
    local, iterations = _core.pdf(field, m, w, vs, b0, tuple(int(p) for p in pads),
                                  _tolerance(tol, "tol"), _iterations(max_iter, "max_iter"),
                                  kernel)
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
    total_field : ndarray, shape (X, Y, Z)
        Unwrapped total field in ppm; values outside ``mask`` are ignored.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
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
    field = _volume(total_field, "total_field")
    m = _mask(mask, field.shape)
    vs = _vec3(voxel_size, "voxel_size", positive=True)
    radius = 2.0 * max(vs) if radius_mm is None else float(radius_mm)
    if not (np.isfinite(radius) and radius >= max(vs)):
        raise ValueError(f"radius_mm must be at least the largest voxel edge {max(vs)} mm, "
                         f"got {radius_mm!r}")
    local, eroded, iterations = _core.ismv(field, m, vs, radius, _tolerance(tol, "tol"),
                                           _iterations(max_iter, "max_iter"))
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
    total_field : ndarray, shape (X, Y, Z)
        Unwrapped total field in ppm; values outside ``mask`` are ignored.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
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
    field = _volume(total_field, "total_field")
    m = _mask(mask, field.shape)
    vs = _vec3(voxel_size, "voxel_size", positive=True)
    local, interior, iterations = _core.lbv(field, m, vs, _tolerance(tol, "tol"),
                                            _iterations(max_iter, "max_iter"))
    logger.debug("lbv: %d CG iterations", iterations)
    return local, interior.astype(bool), int(iterations)


# --------------------------------------------------------------------------- masks, reference


#: Below this ratio of the mean intensities of Otsu's two classes, the lower class is
#: background (noise); above it both classes are tissue (a field of view inside the brain).
_BACKGROUND_CONTRAST = 0.5
#: Threshold, as a fraction of the 99th percentile, used when there is no background class.
_NO_BACKGROUND_FRACTION = 0.25


def magnitude_threshold(values: np.ndarray) -> float:
    """Intensity separating head signal from background in a magnitude image.

    Otsu's threshold when the image has a background (noise) class; when Otsu's two
    classes are both tissue (their mean intensities differ by less than 2x, as in a
    field of view cropped inside the brain) a quarter of the 99th percentile instead,
    so that darker tissue is not cut away.
    """
    level = float(threshold_otsu(values))
    low, high = values[values <= level], values[values > level]
    if low.size and high.size and low.mean() > _BACKGROUND_CONTRAST * high.mean():
        level = _NO_BACKGROUND_FRACTION * float(np.percentile(values, 99))
        logger.info("magnitude has no background class; brain-mask threshold %.4g", level)
    return level


#: Brain-mask methods of :func:`brain_mask` → provenance description.
BRAIN_MASK_METHODS: dict[str, str] = {
    "bet": "deformable surface model (BET-like, Smith 2002) on the echo-1 magnitude",
    "otsu": "Otsu threshold of echo-1 magnitude, opening, largest component, hole filling",
}


def brain_mask(
    magnitude_echo1: np.ndarray,
    *,
    method: str = "otsu",
    voxel_size: Sequence[float] | None = None,
    bet_f: float = 0.5,
    erode_voxels: int = 2,
    threshold: float | None = None,
) -> np.ndarray:
    """Brain mask from the first-echo magnitude.

    ``method="otsu"`` (the default here, kept for existing callers): threshold
    (:func:`magnitude_threshold` unless given) → erode by ``erode_voxels`` (a ball) to
    cut thin links between brain and scalp across the signal-free skull → keep the
    largest connected component → fill holes → dilate back by the same ball, restricted
    to the thresholded voxels → fill holes again.

    ``method="bet"``: the deformable surface model of :func:`alsiron.bet.bet` (Smith
    2002), which stops at the dark skull even where bright tissue (neck, scalp, a
    foramen) connects to the brain; ``erode_voxels`` and ``threshold`` are not used.
    The QSM workflow's default is set in :class:`alsiron.workflow.QsmParameters`.

    Parameters
    ----------
    magnitude_echo1 : ndarray, shape (X, Y, Z)
        Magnitude of the first echo (arbitrary units).
    method : {"otsu", "bet"}
        Masking algorithm (see :data:`BRAIN_MASK_METHODS`). Default "otsu".
    voxel_size : 3 floats, optional
        Voxel edges in mm (used by "bet"; default 1 mm isotropic).
    bet_f : float
        BET fractional intensity threshold in (0, 1); smaller = larger mask. Default 0.5.
    erode_voxels : int
        Radius of the erosion/dilation ball in voxels (0 disables), "otsu" only. Default 2.
    threshold : float, optional
        Intensity threshold, "otsu" only; default :func:`magnitude_threshold` of the
        non-zero voxels.

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)
    """
    mag = _volume(magnitude_echo1, "magnitude_echo1").astype(np.float64)
    if method not in BRAIN_MASK_METHODS:
        raise ValueError(f"unknown brain-mask method {method!r} "
                         f"(choose one of {', '.join(BRAIN_MASK_METHODS)})")
    if erode_voxels < 0:
        raise ValueError(f"erode_voxels must be >= 0, got {erode_voxels}")
    positive = mag[mag > 0]
    if positive.size == 0:
        raise ValueError("magnitude_echo1 has no positive voxel; cannot derive a brain mask")
    if method == "bet":
        from alsiron import bet as bet_module

        return bet_module.bet(mag, voxel_size, f=bet_f).mask
    level = magnitude_threshold(positive) if threshold is None else float(threshold)
    fg = mag > level
    r = int(erode_voxels)
    ball = None
    core = fg
    if r > 0:
        g = np.arange(-r, r + 1)
        ball = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= r * r
        core = ndimage.binary_erosion(fg, structure=ball)
    labels, n = ndimage.label(core)
    if n == 0:
        raise ValueError(
            f"no foreground left after thresholding at {level:.4g} and eroding by {r} voxels; "
            "lower erode_voxels or pass a threshold"
        )
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    largest = labels == (1 + int(np.argmax(sizes)))
    largest = ndimage.binary_fill_holes(largest)
    if ball is not None:
        largest = ndimage.binary_dilation(largest, structure=ball) & (fg | largest)
    mask = ndimage.binary_fill_holes(largest)
    logger.debug("brain_mask: threshold %.4g, %d voxels", level, int(mask.sum()))
    return mask


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
    vs = _vec3(voxel_size, "voxel_size", positive=True)
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


def reference_to_mean(chi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference χ to its mean over ``mask`` (the whole-brain default of DESIGN §3).

    Parameters
    ----------
    chi : ndarray, shape (X, Y, Z)
        Susceptibility in ppm.
    mask : ndarray of bool, shape (X, Y, Z)
        Reference region (usually the brain mask).

    Returns
    -------
    ndarray, float32
        ``chi - mean(chi[mask])`` inside the mask, 0 outside (χ maps are 0 outside the
        brain by convention; NaN is reserved for failed voxels).
    """
    x = _volume(chi, "chi")
    m = _mask(mask, x.shape).astype(bool)
    ref = float(np.mean(x[m], dtype=np.float64))
    return np.where(m, x - np.float32(ref), np.float32(0.0)).astype(np.float32)

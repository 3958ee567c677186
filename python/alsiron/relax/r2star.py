"""R2*/T2* from multi-echo gradient-echo magnitude, with the correction for macroscopic
B0 gradients.

:func:`fit_r2star` offers log-linear, S²-weighted log-linear, ARLO and nonlinear
(Levenberg–Marquardt, optionally Rician-aware) estimators with goodness-of-fit and
Cramér–Rao maps. :func:`fit_r2star_loglinear` (the fast path used by ``alsiron qsm``)
fits ``S(TE) = S0·exp(−R2*·TE)`` voxel-wise by log-linear least squares, optionally
weighted by ``S²`` (one step; markedly less biased at low SNR). The Rust kernels read
echo-major memory ``[E][N]``, which both a C-ordered ``(E, X, Y, Z)`` stack and a
Fortran-ordered nibabel ``(X, Y, Z, E)`` array already are: neither is copied. A
C-ordered ``(X, Y, Z, E)`` array (echoes of a voxel adjacent) is not copied either: the
kernels transpose it chunk by chunk in cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alsiron import _core
from alsiron.errors import InvalidInputError
from alsiron.field.echo_fit import validate_echo_times

log = logging.getLogger("alsiron")

#: Names accepted by :func:`fit_r2star`'s ``method``.
R2STAR_METHODS: tuple[str, ...] = ("loglinear", "weighted", "arlo", "nlls")

#: Meaning of the codes in :attr:`R2starResult.status`.
R2STAR_STATUS: dict[int, str] = {
    0: "ok",
    1: "magnitude zero, negative or non-finite in at least one echo",
    2: "degenerate fit (weight on a single echo) or non-finite result",
    3: "outside mask",
    4: "nonlinear fit did not converge within the iteration limit",
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
    method : str
        Estimator, one of :data:`R2STAR_METHODS`.
    r2star_sd : ndarray, float32, or None
        Cramér–Rao standard deviation of R2* [s⁻¹] at the fitted parameters, for the
        noise level ``noise_sigma`` or, when that is None, the residual estimate
        RSS/(E−2) (NaN with 2 echoes); None from :func:`fit_r2star_loglinear`.
    gof : ndarray, float32, or None
        Goodness of fit R² = 1 − RSS/TSS of the fitted signal model (magnitude units).
    noise_sigma : float or None
        Noise standard deviation that was given (Rician model for ``nlls``).
    """

    r2star: np.ndarray
    t2star: np.ndarray
    s0: np.ndarray
    status: np.ndarray
    weighted: bool
    echo_times: tuple[float, ...]
    method: str = "loglinear"
    r2star_sd: np.ndarray | None = None
    gof: np.ndarray | None = None
    noise_sigma: float | None = None


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


def _voxel_major(magnitude: np.ndarray, n_echoes: int) -> np.ndarray | None:
    """A C-ordered (..., E) array as a float32 (N, E) view (a copy only to convert the
    dtype, never a transpose), or None when the array is not laid out that way. The
    Rust kernels transpose it chunk by chunk in cache."""
    if (magnitude.ndim >= 2 and magnitude.shape[-1] == n_echoes
            and magnitude.shape[0] != n_echoes and magnitude.flags.c_contiguous
            and not magnitude.flags.f_contiguous):
        return np.ascontiguousarray(magnitude.reshape(-1, n_echoes), dtype=np.float32)
    return None


def _prepare(magnitude, echo_times, mask, n_min: int, allow_voxel_major: bool = False):
    """Validate the inputs; returns (flat, tes, vol_shape, voxel_order, mask_flat,
    voxel_major): ``flat`` is (E, N), or (N, E) when ``voxel_major``."""
    magnitude = np.asarray(magnitude)
    if not np.issubdtype(magnitude.dtype, np.number) or np.iscomplexobj(magnitude):
        raise ValueError(f"magnitude must be real numbers, got dtype {magnitude.dtype}")
    n_echoes = np.asarray(echo_times).size
    tes = validate_echo_times(echo_times, n_echoes, minimum=n_min)
    flat = _voxel_major(magnitude, n_echoes) if allow_voxel_major else None
    voxel_major = flat is not None
    if voxel_major:
        vol_shape, voxel_order = magnitude.shape[:-1], "C"
    else:
        flat, vol_shape, voxel_order = _echo_major(magnitude, n_echoes)
    mask_flat = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != vol_shape:
            raise ValueError(f"mask has shape {mask.shape}, expected {vol_shape}")
        mask_flat = np.ascontiguousarray((mask != 0).reshape(-1, order=voxel_order),
                                         dtype=np.uint8)
    return flat, tes, vol_shape, voxel_order, mask_flat, voxel_major


def _t2(r2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 > 0, 1.0 / r2, np.nan).astype(np.float32)


def fit_r2star(
    magnitude: np.ndarray,
    echo_times: Sequence[float],
    *,
    method: str = "weighted",
    mask: np.ndarray | None = None,
    noise_sigma: float | None = None,
    max_iter: int = 100,
    quality: bool = True,
) -> R2starResult:
    """Fit R2*, S0 and quality maps voxel-wise with a choice of estimator.

    Parameters
    ----------
    magnitude : ndarray, shape (E, X, Y, Z) or (X, Y, Z, E)
        Magnitude of E echoes (layouts as in :func:`fit_r2star_loglinear`; any leading
        volume shape works, e.g. (E, N)).
    echo_times : sequence of float
        Echo times [s], strictly increasing. Uneven spacing is allowed for every method.
    method : {"loglinear", "weighted", "arlo", "nlls"}
        ``loglinear``: least squares of ln S; ``weighted``: weights ∝ S² (one step);
        ``arlo``: auto-regression on linear operations (Pei et al. MRM 2015; needs ≥ 3
        echoes; Simpson's rule, non-uniform when the spacing is uneven); ``nlls``:
        Levenberg–Marquardt on S0·exp(−R2*·TE) started from the weighted fit, on the
        Rician first moment when ``noise_sigma`` is given.
    mask : ndarray of the volume shape, optional
        Voxels to fit (nonzero = inside); outside → NaN with status 3.
    noise_sigma : float, optional
        Standard deviation of the noise in each real/imaginary channel (magnitude units).
        Used for the Cramér–Rao map of every method, and makes ``nlls`` fit the Rician
        mean (removes the noise-floor bias of late echoes).
    max_iter : int
        Iteration limit of the nonlinear fit (status 4 when reached).
    quality : bool
        Compute the R² and Cramér–Rao maps (one more pass over the data); False leaves
        them NaN and roughly doubles the speed of the closed-form methods.

    Returns
    -------
    R2starResult
        ``r2star`` [s⁻¹], ``t2star`` [s], ``s0``, ``r2star_sd`` [s⁻¹], ``gof`` (R²),
        ``status`` (see :data:`R2STAR_STATUS`); NaN wherever status ≠ 0.
    """
    if method not in R2STAR_METHODS:
        raise InvalidInputError(f"unknown R2* method {method!r}; choose one of {R2STAR_METHODS}")
    if noise_sigma is not None and not (np.isfinite(noise_sigma) and noise_sigma > 0):
        raise InvalidInputError(f"noise_sigma must be a positive number, got {noise_sigma}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    flat, tes, vol_shape, order, mask_flat, voxel_major = _prepare(
        magnitude, echo_times, mask, 3 if method == "arlo" else 2, allow_voxel_major=True)
    sigma = None if noise_sigma is None else float(noise_sigma)
    r2, s0, sd, gof, status = _core.fit_r2star(flat, list(tes), mask_flat, method, sigma,
                                               int(max_iter), bool(quality),
                                               voxel_major=voxel_major)
    r2, s0, sd, gof, status = (a.reshape(vol_shape, order=order)
                               for a in (r2, s0, sd, gof, status))
    return R2starResult(r2star=r2, t2star=_t2(r2), s0=s0, status=status,
                        weighted=method == "weighted", echo_times=tes, method=method,
                        r2star_sd=sd, gof=gof, noise_sigma=sigma)


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
        Magnitude of E ≥ 2 echoes. A C-ordered (E, ...) stack, a Fortran-ordered
        (..., E) nibabel array or a C-ordered (..., E) array is used without copying when
        it is float32 (the last chunk by chunk in cache). When both the
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
    flat, tes, vol_shape, voxel_order, mask_flat, voxel_major = _prepare(
        magnitude, echo_times, mask, 2, allow_voxel_major=True)
    r2, s0, status = _core.fit_r2star_loglinear(flat, list(tes), mask_flat, bool(weighted),
                                                voxel_major=voxel_major)
    r2 = r2.reshape(vol_shape, order=voxel_order)
    s0 = s0.reshape(vol_shape, order=voxel_order)
    status = status.reshape(vol_shape, order=voxel_order)
    return R2starResult(r2star=r2, t2star=_t2(r2), s0=s0, status=status,
                        weighted=bool(weighted), echo_times=tes,
                        method="weighted" if weighted else "loglinear")


def gradient_dephasing_factor(omega: np.ndarray, echo_times: Sequence[float],
                              mask: np.ndarray) -> np.ndarray:
    """Signal fraction left by intravoxel dephasing in a macroscopic field gradient.

    With a field linear across the voxel, the phase spread at TE along axis i is
    g_i·TE (g_i = ∂ω/∂i, rad/s per voxel) and the magnitude is scaled by
    F(TE) = Π_i sinc(g_i·TE/2π) (numpy's normalised sinc). Dividing the magnitude by F
    before the R2* fit removes the apparent R2* increase from macroscopic gradients
    (Hirsch & Preibisch AJNR 2013; a first-order form of Yablonskiy's voxel spread
    function).

    Parameters
    ----------
    omega : ndarray, shape (X, Y, Z)
        Off-resonance [rad/s] (``FieldMapResult.omega``); NaN where unknown.
    echo_times : sequence of float
        Echo times [s].
    mask : ndarray of bool, shape (X, Y, Z)
        Where gradients are taken (central differences inside, one-sided at the edge).

    Returns
    -------
    ndarray, float32, shape (E, X, Y, Z)
        F per echo; 1 outside ``mask`` and where the gradient is unknown.
    """
    omega = np.where(np.asarray(mask, bool), np.asarray(omega, np.float64), np.nan)
    factor = np.ones((len(echo_times), *omega.shape), np.float64)
    for axis in range(omega.ndim):
        fwd = np.diff(omega, axis=axis, append=np.nan)
        bwd = np.diff(omega, axis=axis, prepend=np.nan)
        grad = np.where(np.isfinite(fwd) & np.isfinite(bwd), 0.5 * (fwd + bwd),
                        np.where(np.isfinite(fwd), fwd, bwd))
        grad = np.nan_to_num(grad, nan=0.0)
        for k, te in enumerate(echo_times):
            factor[k] *= np.sinc(grad * te / (2 * np.pi))
    return factor.astype(np.float32)

"""R2*/T2* relaxometry from multi-echo gradient-echo magnitude, and T2/B1 from multi-echo
spin echo.

:func:`fit_r2star` offers log-linear, S²-weighted log-linear, ARLO and nonlinear
(Levenberg–Marquardt, optionally Rician-aware) estimators with goodness-of-fit and
Cramér–Rao maps. :func:`fit_r2star_loglinear` (the fast path used by ``alsiron qsm``)
fits ``S(TE) = S0·exp(−R2*·TE)`` voxel-wise by log-linear least squares, optionally
weighted by ``S²`` (one step; markedly less biased at low SNR). The Rust kernels read
echo-major memory ``[E][N]``, which both a C-ordered ``(E, X, Y, Z)`` stack and a
Fortran-ordered nibabel ``(X, Y, Z, E)`` array already are: neither is copied. A
C-ordered ``(X, Y, Z, E)`` array (echoes of a voxel adjacent) is not copied either: the
kernels transpose it chunk by chunk in cache.

:func:`fit_t2_epg` fits T2, S0 and the refocusing-angle scale B1 with extended phase
graphs (stimulated echoes included); :func:`fit_t2_monoexponential` is the comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alsiron import _core
from alsiron.fieldmap import validate_echo_times

log = logging.getLogger("alsiron")

__all__ = ["R2STAR_METHODS", "R2STAR_STATUS", "R2starResult", "T2Result", "fit_r2star",
           "fit_r2star_loglinear", "fit_t2_epg", "fit_t2_monoexponential",
           "gradient_dephasing_factor", "simulate_mese"]

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
        raise ValueError(f"unknown R2* method {method!r}; choose one of {R2STAR_METHODS}")
    if noise_sigma is not None and not (np.isfinite(noise_sigma) and noise_sigma > 0):
        raise ValueError(f"noise_sigma must be a positive number, got {noise_sigma}")
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



# --------------------------------------------------------------------- MESE: T2 and B1
@dataclass(frozen=True)
class T2Result:
    """Maps of :func:`fit_t2_epg` / :func:`fit_t2_monoexponential` (volume shape).

    Attributes
    ----------
    t2 : ndarray, float32
        T2 [s]; NaN where the fit failed (see ``status``, codes of :data:`R2STAR_STATUS`).
    r2 : ndarray, float32
        R2 = 1/T2 [s⁻¹].
    s0 : ndarray, float32
        Signal at TE = 0 of the fitted model (magnitude units).
    b1 : ndarray, float32, or None
        Refocusing-angle scale (actual/nominal angle) from the EPG fit; None for the
        mono-exponential fit.
    gof : ndarray, float32
        Goodness of fit R² (magnitude units).
    status : ndarray, uint8
        Reason code per voxel.
    method : str
        ``"epg"`` or ``"monoexponential"`` (with ``"-drop-first"`` when echo 1 was left out).
    echo_times : tuple of float
        Echo times [s] of the data.
    refocusing_angle : float or None
        Nominal refocusing angle [degrees] used by the EPG fit.
    """

    t2: np.ndarray
    r2: np.ndarray
    s0: np.ndarray
    b1: np.ndarray | None
    gof: np.ndarray
    status: np.ndarray
    method: str
    echo_times: tuple[float, ...]
    refocusing_angle: float | None = None


def _check_sequence(echo_spacing: float, refocusing_angle: float, t1: float) -> None:
    if not (np.isfinite(echo_spacing) and echo_spacing > 0):
        raise ValueError(f"echo_spacing must be a positive number of seconds, got "
                         f"{echo_spacing} (MESE sidecars need EchoTime or EchoSpacing)")
    if echo_spacing > 1.0:
        raise ValueError(f"echo_spacing {echo_spacing} looks like milliseconds; give seconds")
    if not (np.isfinite(refocusing_angle) and 0 < refocusing_angle <= 180):
        raise ValueError(f"refocusing_angle must be in (0, 180] degrees, got {refocusing_angle}")
    if not (np.isfinite(t1) and t1 > 0):
        raise ValueError(f"t1 must be a positive number of seconds, got {t1}")


def simulate_mese(t2: np.ndarray, b1: np.ndarray | float, *, n_echoes: int,
                  echo_spacing: float, refocusing_angle: float, t1: float = 1.0
                  ) -> np.ndarray:
    """CPMG echo amplitudes (S0 = 1) by extended phase graphs.

    Parameters
    ----------
    t2 : ndarray
        T2 [s] per voxel, any shape.
    b1 : ndarray or float
        Refocusing-angle scale (actual/nominal), broadcast to ``t2``'s shape.
    n_echoes : int
        Number of echoes (≥ 3); echo k is at k·``echo_spacing``.
    echo_spacing : float
        Echo spacing [s].
    refocusing_angle : float
        Nominal refocusing angle [degrees]; the pulse is ``b1·refocusing_angle``.
    t1 : float
        T1 [s] of the longitudinal (stimulated-echo) pathways.

    Returns
    -------
    ndarray, float32, shape (n_echoes,) + t2.shape
        Echo magnitudes; NaN where T2 or B1 is not positive.
    """
    _check_sequence(echo_spacing, refocusing_angle, t1)
    t2 = np.asarray(t2, dtype=np.float64)
    b1 = np.broadcast_to(np.asarray(b1, dtype=np.float64), t2.shape)
    flat = _core.cpmg_echo_trains(np.ascontiguousarray(t2.ravel()),
                                  np.ascontiguousarray(b1.ravel()), int(n_echoes),
                                  float(echo_spacing), float(refocusing_angle), float(t1))
    return flat.reshape((int(n_echoes),) + t2.shape)


def fit_t2_epg(
    magnitude: np.ndarray,
    echo_spacing: float,
    refocusing_angle: float,
    *,
    mask: np.ndarray | None = None,
    t1: float = 1.0,
    t2_bounds: tuple[float, float] = (0.005, 2.0),
    b1_min: float = 0.3,
    max_iter: int = 200,
) -> T2Result:
    """Stimulated-echo corrected T2 fit of multi-echo spin echo by extended phase graphs.

    Fits S0, T2 and the refocusing-angle scale B1 per voxel by Levenberg–Marquardt on
    the EPG echo amplitudes (derivatives by forward-mode differentiation), started from a
    log-linear T2 of echoes 2… and a coarse B1 scan. B1 is bounded to
    [``b1_min``, 180/``refocusing_angle``] because angles 180°±x give the same echoes.

    Parameters
    ----------
    magnitude : ndarray, shape (E, X, Y, Z) or (X, Y, Z, E)
        Magnitudes of E ≥ 3 echoes at TE_k = k·``echo_spacing``. The echo axis is the
        last one for a Fortran-ordered array (as nibabel returns it), else the first.
    echo_spacing : float
        Echo spacing [s] (the first echo time).
    refocusing_angle : float
        Nominal refocusing flip angle [degrees], in (0, 180].
    mask : ndarray of the volume shape, optional
        Voxels to fit; outside → NaN with status 3.
    t1 : float
        Assumed T1 [s] (weak influence; 1 s is typical of brain at 3 T).
    t2_bounds : (float, float)
        Bounds on T2 [s].
    b1_min : float
        Lower bound on B1.
    max_iter : int
        Levenberg–Marquardt iteration limit (status 4 when reached).

    Returns
    -------
    T2Result
        ``t2`` [s], ``r2`` [s⁻¹], ``s0``, ``b1``, ``gof``, ``status``.
    """
    _check_sequence(echo_spacing, refocusing_angle, t1)
    magnitude = np.asarray(magnitude)
    if magnitude.ndim < 2:
        raise ValueError(f"magnitude must have an echo axis, got shape {magnitude.shape}")
    # Echo axis: last for a Fortran-ordered (nibabel) array, else first.
    fortran = magnitude.flags.f_contiguous and not magnitude.flags.c_contiguous
    n_echoes = magnitude.shape[-1] if fortran else magnitude.shape[0]
    tes = tuple(float(echo_spacing) * k for k in range(1, n_echoes + 1))
    flat, tes, vol_shape, order, mask_flat, _ = _prepare(magnitude, tes, mask, 3)
    lo, hi = (float(b) for b in t2_bounds)
    t2, s0, b1, gof, status = _core.fit_t2_epg(flat, float(echo_spacing),
                                               float(refocusing_angle), mask_flat, float(t1),
                                               lo, hi, float(b1_min), int(max_iter))
    t2, s0, b1, gof, status = (a.reshape(vol_shape, order=order)
                               for a in (t2, s0, b1, gof, status))
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(t2 > 0, 1.0 / t2, np.nan).astype(np.float32)
    return T2Result(t2=t2, r2=r2, s0=s0, b1=b1, gof=gof, status=status, method="epg",
                    echo_times=tes, refocusing_angle=float(refocusing_angle))


def fit_t2_monoexponential(
    magnitude: np.ndarray,
    echo_times: Sequence[float],
    *,
    drop_first: bool = True,
    method: str = "nlls",
    mask: np.ndarray | None = None,
    noise_sigma: float | None = None,
) -> T2Result:
    """Mono-exponential T2 of multi-echo spin echo (the comparison to :func:`fit_t2_epg`).

    Uses :func:`fit_r2star` on the echo train; with ``drop_first`` the first echo (which
    lacks the stimulated-echo contribution of the later ones) is left out.

    Parameters
    ----------
    magnitude : ndarray, shape (E, X, Y, Z) or (X, Y, Z, E)
        Spin-echo magnitudes.
    echo_times : sequence of float
        Echo times [s].
    drop_first : bool
        Leave out echo 1.
    method, mask, noise_sigma
        As in :func:`fit_r2star`.

    Returns
    -------
    T2Result
        ``b1`` is None.
    """
    tes = np.asarray(echo_times, dtype=np.float64)
    magnitude = np.asarray(magnitude)
    if drop_first:
        if magnitude.shape[0] == tes.size and (magnitude.shape[-1] != tes.size
                                                or magnitude.flags.c_contiguous):
            magnitude = magnitude[1:]
        else:
            magnitude = magnitude[..., 1:]
        tes = tes[1:]
    res = fit_r2star(magnitude, tes, method=method, mask=mask, noise_sigma=noise_sigma)
    return T2Result(t2=res.t2star, r2=res.r2star, s0=res.s0, b1=None, gof=res.gof,
                    status=res.status, echo_times=tuple(float(t) for t in echo_times),
                    method="monoexponential" + ("-drop-first" if drop_first else ""))


# ------------------------------------------------- macroscopic B0 gradient correction
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

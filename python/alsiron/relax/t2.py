"""T2 and B1 from multi-echo spin echo: stimulated-echo corrected fit by extended phase
graphs (EPG), the mono-exponential fit it corrects, and the MESE forward model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alsiron import _core
from alsiron.errors import InvalidInputError
from alsiron.relax.r2star import _prepare, fit_r2star


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
        raise InvalidInputError(f"echo_spacing must be a positive number of seconds, got "
                                f"{echo_spacing} (MESE sidecars need EchoTime or EchoSpacing)")
    if echo_spacing > 1.0:
        raise InvalidInputError(f"echo_spacing {echo_spacing} looks like milliseconds; give "
                                "seconds")
    if not (np.isfinite(refocusing_angle) and 0 < refocusing_angle <= 180):
        raise InvalidInputError("refocusing_angle must be in (0, 180] degrees, got "
                                f"{refocusing_angle}")
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

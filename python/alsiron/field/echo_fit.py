"""Phase unwrapping and multi-echo field-map estimation.

Thin validating wrappers over :mod:`alsiron._core`:

- :func:`unwrap_phase`: exact quality-guided region-growing unwrapping of one 3-D phase
  (ROMEO-like; Dymerska et al., MRM 2021). The result differs from the input by integer
  multiples of 2π; each disconnected part of the mask is fixed up to its own constant 2πk
  (its best voxel keeps its wrapped value). Voxels outside the mask keep their input value.
- :func:`fit_multi_echo_field`: monopolar multi-echo fit of the off-resonance ω:
  the closest echo pair's phase difference is unwrapped in space (the mean of each
  connected part of the mask brought within ±π), the phase offset is
  ``φ0 = wrap(φ1 − ω·TE1)``, every echo is unwrapped in time against ``φ0 + ω·TE``,
  and ω is the magnitude²-weighted least-squares slope of ``φ_k − φ0`` against ``TE_k``.
  The field in ppm is ``ω / (2π·γ̄·B0)·1e6``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alsiron import _core
from alsiron.constants import GAMMA_BAR_HZ_PER_T
from alsiron.errors import InvalidInputError

log = logging.getLogger("alsiron")

__all__ = [
    "FieldMapResult",
    "fit_multi_echo_field",
    "omega_to_ppm",
    "unwrap_phase",
    "validate_echo_times",
]


@dataclass(frozen=True)
class FieldMapResult:
    """Output of :func:`fit_multi_echo_field`; every map has shape (X, Y, Z), float32.

    Attributes
    ----------
    field_ppm : ndarray
        Total field [ppm of B0]; NaN outside the mask and where the fit failed.
    omega : ndarray
        Angular off-resonance ω [rad/s].
    phase_offset : ndarray
        Phase at TE = 0, φ0 [rad], in [−π, π].
    residual : ndarray
        Magnitude²-weighted RMS phase residual of the fit [rad]; 0 for noiseless data.
        Values above ~0.3–0.5 rad mark unreliable phase (use for phase-quality masking).
    field_strength : float
        B0 [T] used for the ppm conversion.
    echo_times : tuple of float
        Echo times [s].
    """

    field_ppm: np.ndarray
    omega: np.ndarray
    phase_offset: np.ndarray
    residual: np.ndarray
    field_strength: float
    echo_times: tuple[float, ...]


def validate_echo_times(echo_times: Sequence[float], n_echoes: int, *, minimum: int = 2
                        ) -> tuple[float, ...]:
    """Check echo times [s]: ``n_echoes`` of them, ≥ ``minimum``, finite, ≥ 0, increasing.

    Returns them as a tuple of floats; raises ValueError with an actionable message.
    """
    tes = np.asarray(echo_times, dtype=np.float64).ravel()
    if tes.size != n_echoes:
        raise InvalidInputError(f"got {tes.size} echo times for {n_echoes} echoes")
    if n_echoes < minimum:
        raise InvalidInputError(f"need at least {minimum} echoes, got {n_echoes}")
    if not np.all(np.isfinite(tes)) or np.any(tes < 0):
        raise InvalidInputError("echo times must be finite non-negative seconds, got "
                                f"{tes.tolist()}")
    if np.any(np.diff(tes) <= 0):
        raise InvalidInputError(f"echo times must be strictly increasing, got {tes.tolist()}")
    if tes[-1] > 1.0:
        raise InvalidInputError(f"echo times look like milliseconds ({tes.tolist()}); give seconds")
    return tuple(float(t) for t in tes)


def _mask_u8(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=np.uint8)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape}, expected {shape}")
    return np.ascontiguousarray(mask != 0, dtype=np.uint8)


def omega_to_ppm(omega: np.ndarray, field_strength: float) -> np.ndarray:
    """Convert angular off-resonance ω [rad/s] to field [ppm] at B0 = ``field_strength`` [T]."""
    if not (np.isfinite(field_strength) and field_strength > 0):
        raise InvalidInputError("field_strength must be a positive number of tesla, got "
                                f"{field_strength}")
    scale = 1e6 / (2.0 * np.pi * GAMMA_BAR_HZ_PER_T * float(field_strength))
    return (np.asarray(omega, dtype=np.float64) * scale).astype(np.float32)


def unwrap_phase(
    phase: np.ndarray,
    magnitude: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Unwrap a 3-D phase exactly by quality-guided region growing.

    Parameters
    ----------
    phase : ndarray, shape (X, Y, Z)
        Wrapped phase [rad].
    magnitude : ndarray, shape (X, Y, Z), optional
        Magnitude guiding the growth (bright, smooth regions first); default all ones.
    mask : ndarray, shape (X, Y, Z), optional
        Voxels to unwrap (nonzero = inside); default everything.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        Unwrapped phase [rad] = input + 2π·k per voxel; voxels outside the mask or with
        non-finite phase/magnitude keep their input value.
    """
    phase = np.asarray(phase)
    if phase.ndim != 3:
        raise ValueError(f"phase must be 3-D (X, Y, Z), got shape {phase.shape}")
    if magnitude is None:
        magnitude = np.ones(phase.shape, dtype=np.float32)
    magnitude = np.asarray(magnitude)
    if magnitude.shape != phase.shape:
        raise ValueError(f"magnitude has shape {magnitude.shape}, expected {phase.shape}")
    return _core.unwrap_phase(
        np.ascontiguousarray(phase, dtype=np.float32),
        np.ascontiguousarray(magnitude, dtype=np.float32),
        _mask_u8(mask, phase.shape),
    )


def fit_multi_echo_field(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray | None = None,
    *,
    field_strength: float,
    echo_axis: int = 0,
) -> FieldMapResult:
    """Estimate the total field from monopolar multi-echo magnitude and phase.

    Parameters
    ----------
    magnitude, phase : ndarray, shape (E, X, Y, Z) (or (X, Y, Z, E) with ``echo_axis=-1``)
        Magnitude (any units) and phase [rad] of E ≥ 2 echoes.
    echo_times : sequence of float
        Echo times [s], strictly increasing.
    mask : ndarray, shape (X, Y, Z), optional
        Voxels to fit (nonzero = inside); default everything. Outside → NaN.
    field_strength : float
        B0 [T] for the conversion to ppm.
    echo_axis : {0, -1, 3}
        Axis of the echoes in ``magnitude`` and ``phase``.

    Returns
    -------
    FieldMapResult
        ``field_ppm`` [ppm], ``omega`` [rad/s], ``phase_offset`` [rad], ``residual`` [rad].
    """
    magnitude = np.asarray(magnitude)
    phase = np.asarray(phase)
    if magnitude.ndim != 4 or phase.ndim != 4:
        raise ValueError(
            f"magnitude and phase must be 4-D, got {magnitude.shape} and {phase.shape}")
    if magnitude.shape != phase.shape:
        raise ValueError(f"magnitude {magnitude.shape} and phase {phase.shape} differ in shape")
    if echo_axis not in (0, -1, 3):
        raise ValueError(f"echo_axis must be 0 or -1, got {echo_axis}")
    if echo_axis != 0:
        magnitude = np.moveaxis(magnitude, -1, 0)
        phase = np.moveaxis(phase, -1, 0)
    tes = validate_echo_times(echo_times, magnitude.shape[0])
    omega_to_ppm(np.zeros(1), field_strength)  # validates field_strength before the fit
    vol_shape = magnitude.shape[1:]
    omega, phi0, residual = _core.fit_multi_echo_field(
        np.ascontiguousarray(magnitude, dtype=np.float32),
        np.ascontiguousarray(phase, dtype=np.float32),
        list(tes),
        _mask_u8(mask, vol_shape),
    )
    log.debug("field fit: %d echoes, TE %s s, B0 %.3g T", len(tes), tes, field_strength)
    return FieldMapResult(
        field_ppm=omega_to_ppm(omega, field_strength),
        omega=omega,
        phase_offset=phi0,
        residual=residual,
        field_strength=float(field_strength),
        echo_times=tes,
    )


# ----------------------------------------------------------------- multi-echo ROMEO chain

#: Spatial unwrapping methods of :func:`estimate_field` → provenance description.
UNWRAPPING_METHODS: dict[str, str] = {
    "romeo": "ROMEO-style quality-guided region growing of the first echo (phase coherence, "
             "phase-gradient coherence with echo 2, magnitude coherence and weight) after "
             "MCPC-3D-S offset removal, then temporal unwrapping of the other echoes",
    "laplacian": "Laplacian unwrapping (FFT Poisson solve, snapped to input + 2πk) of the "
                 "first echo after MCPC-3D-S offset removal, then temporal unwrapping",
    "echodiff": "quality-guided region growing of the closest echo pair's phase "
                "difference, then temporal unwrapping of every echo",
}

#: How the multi-echo fit treats the phase offset φ0 → provenance description.
PHASE_OFFSET_METHODS: dict[str, str] = {
    "smoothed": "φ0 fitted per voxel (free intercept), smoothed by a residual-weighted "
                "local-linear Gaussian fit (twiced) and held fixed in the final fit",
    "fitted": "φ0 fitted per voxel (free intercept)",
    "fixed": "φ0 fixed to the offset estimate (MCPC-3D-S, or the echo pair's for echodiff)",
}

#: Default of :func:`estimate_field`'s ``phase_offset``.
DEFAULT_PHASE_OFFSET = "smoothed"

#: Gaussian σ of the local-linear smoothing of the fitted φ0 ("smoothed"): the larger
#: of OFFSET_SIGMA_MM [mm] (small, for little bias where φ0 curves) and
#: OFFSET_SIGMA_VOXELS voxel edges (enough voxels to average the intercepts' noise);
#: OFFSET_PASSES = 3 (thriced). Chosen with bench/field_offset.py (docs/field.md).
OFFSET_SIGMA_MM = 2.0
OFFSET_SIGMA_VOXELS = 2.0
OFFSET_PASSES = 3

#: Phase residual [rad] at which a voxel's weight in the φ0 smoothing is halved.
OFFSET_RESIDUAL_SCALE = 0.1

#: Default Gaussian σ [mm] of the MCPC-3D-S phase-offset smoothing.
MCPC_SIGMA_MM = 4.0


@dataclass(frozen=True)
class FieldEstimate:
    """Output of :func:`estimate_field`; maps have shape (X, Y, Z), float32, NaN outside.

    Attributes
    ----------
    field_ppm : ndarray
        Total field [ppm of B0].
    field_sd_ppm : ndarray
        Standard deviation of ``field_ppm`` from the noise [ppm]: the Cramér–Rao bound of
        the magnitude-weighted complex fit, ``σ·sqrt(Σm²/(Σm²·Σm²t² − (Σm²t)²))/(2πγ̄B0)``
        with σ the complex noise estimated from the fit residuals (median over the mask).
    omega : ndarray
        Angular off-resonance ω [rad/s].
    phase_offset : ndarray
        φ0 [rad] at TE = 0, in [−π, π].
    residual : ndarray
        Magnitude²-weighted RMS phase residual of the fit [rad] (phase quality).
    noise_sigma : float
        Estimated complex noise σ (magnitude units); NaN with two echoes.
    method : dict
        Provenance: unwrapping, offset removal and fit actually used.
    """

    field_ppm: np.ndarray
    field_sd_ppm: np.ndarray
    omega: np.ndarray
    phase_offset: np.ndarray
    residual: np.ndarray
    noise_sigma: float
    method: dict


def _echoes(magnitude: np.ndarray, phase: np.ndarray, echo_times: Sequence[float]
            ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    magnitude = np.asarray(magnitude)
    phase = np.asarray(phase)
    if magnitude.ndim != 4 or magnitude.shape != phase.shape:
        raise ValueError(f"magnitude {magnitude.shape} and phase {phase.shape} must be equal "
                         "4-D (E, X, Y, Z) arrays")
    tes = validate_echo_times(echo_times, magnitude.shape[0])
    return (np.ascontiguousarray(magnitude, dtype=np.float32),
            np.ascontiguousarray(phase, dtype=np.float32), tes)


def _wrap32(x: np.ndarray) -> np.ndarray:
    """Wrap float32 angles to [−π, π] without complex temporaries."""
    x = np.array(x, dtype=np.float32)  # a copy, modified in place below
    turns = x * np.float32(1.0 / (2 * np.pi))
    np.rint(turns, out=turns)
    turns *= np.float32(2 * np.pi)
    x -= turns
    return x


def mcpc3ds_phase_offset(magnitude: np.ndarray, phase: np.ndarray,
                         echo_times: Sequence[float], mask: np.ndarray | None = None, *,
                         voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                         sigma_mm: float = MCPC_SIGMA_MM) -> np.ndarray:
    """Phase offset φ0(x) at TE = 0 by MCPC-3D-S (Eckstein et al., MRM 2018).

    The closest echo pair's Hermitian product ``S_{p+1}·conj(S_p)`` is unwrapped in space
    (its phase is ω·ΔTE; φ0 cancels), the raw offset is ``φ0 = φ_p − TE_p·ω`` and it is
    smoothed as a complex, magnitude-weighted field with a Gaussian of ``sigma_mm``
    (φ0 from coil sensitivities is smooth; smoothing removes the noise that the
    extrapolation to TE = 0 amplifies).

    Parameters
    ----------
    magnitude, phase : ndarray, shape (E, X, Y, Z)
        Magnitude and wrapped phase [rad], E ≥ 2.
    echo_times : sequence of float
        Echo times [s].
    mask : ndarray, shape (X, Y, Z), optional
        Where the signal is (default everywhere).
    voxel_size : 3 floats
        Voxel edges [mm] (anisotropic smoothing in voxels).
    sigma_mm : float
        Gaussian σ [mm]; 0 disables smoothing.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        φ0 [rad] in [−π, π]; 0 outside the mask.
    """
    from scipy import ndimage

    mag, ph, tes = _echoes(magnitude, phase, echo_times)
    m = _mask_u8(mask, mag.shape[1:]) != 0
    shape = m.shape
    p = min(range(len(tes) - 1), key=lambda k: (tes[k + 1] - tes[k], k))
    # φ0 is smooth, so it is estimated on a grid coarser by `factor` when the smoothing
    # spans several voxels (complex block sums keep the phase information): 8x fewer
    # voxels to unwrap and smooth at 1 mm.
    sig_vox = [sigma_mm / float(v) for v in voxel_size]
    factor = max(1, int(min(sig_vox) // 2)) if sigma_mm > 0 else 1
    pad = [(0, (-n) % factor) for n in shape]
    coarse_shape = tuple((n + (-n) % factor) // factor for n in shape)

    def block_sum(x: np.ndarray) -> np.ndarray:
        if factor == 1:
            return x
        if any(after for _, after in pad):
            x = np.pad(x, pad)
        c = coarse_shape
        return x.reshape(c[0], factor, c[1], factor, c[2], factor).sum(axis=(1, 3, 5))

    # Real arithmetic in float32 (no complex temporaries): the Hermitian product
    # S_q·conj(S_p) = m_p·m_q·e^{i(φq − φp)} and the echo S_p itself, zero outside.
    mp = np.where(m, mag[p], np.float32(0.0))
    mpq = mp * mag[p + 1]
    dph = ph[p + 1] - ph[p]
    herm_re, herm_im = block_sum(mpq * np.cos(dph)), block_sum(mpq * np.sin(dph))
    first_re, first_im = block_sum(mp * np.cos(ph[p])), block_sum(mp * np.sin(ph[p]))
    del mp, mpq, dph
    inside = block_sum(m.astype(np.float32)) > 0
    inside_u8 = np.ascontiguousarray(inside, np.uint8)
    pair_mag = np.sqrt(np.hypot(herm_re, herm_im)).astype(np.float32)
    dphi = _core.unwrap_phase(np.ascontiguousarray(np.arctan2(herm_im, herm_re), np.float32),
                              pair_mag, inside_u8)
    dphi = _centre_parts(dphi, pair_mag, inside)
    raw = np.arctan2(first_im, first_re) - np.float32(tes[p] / (tes[p + 1] - tes[p])) * dphi
    weight = np.where(inside, np.hypot(first_re, first_im), np.float32(0.0))
    re = (weight * np.cos(raw)).astype(np.float32)
    im = (weight * np.sin(raw)).astype(np.float32)
    if sigma_mm > 0:
        sig = [sv / factor for sv in sig_vox]
        re = ndimage.gaussian_filter(re, sig, mode="constant", truncate=3.0)
        im = ndimage.gaussian_filter(im, sig, mode="constant", truncate=3.0)
    if factor > 1:
        # Linear interpolation of the smooth complex field back to the full grid (a
        # coarse sample sits at the centre of its block).
        re, im = (_upsample_linear(a, factor, shape) for a in (re, im))
    return np.where(m, np.arctan2(im, re), np.float32(0.0)).astype(np.float32)


def _upsample_linear(coarse: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation of a block-centred coarse grid to ``shape``."""
    out = coarse
    for axis, n in enumerate(shape):
        x = (np.arange(n) + 0.5) / factor - 0.5
        lo = np.clip(np.floor(x).astype(np.intp), 0, coarse.shape[axis] - 1)
        hi = np.clip(lo + 1, 0, coarse.shape[axis] - 1)
        w = np.clip(x - lo, 0.0, 1.0).astype(np.float32)
        w = w.reshape([-1 if d == axis else 1 for d in range(3)])
        a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        out = a + w * (b - a)
    return out


def _centre_parts(unwrapped: np.ndarray, weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift each connected part of ``mask`` by the 2πk bringing its weighted mean near 0."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return unwrapped
    ids = np.arange(1, n + 1)
    w = np.where(mask, weight.astype(np.float64) ** 2, 0.0)
    sw = ndimage.sum(w, labels, ids)
    swv = ndimage.sum(w * np.where(mask, unwrapped, 0.0), labels, ids)
    mean = np.where(sw > 0, swv / np.where(sw > 0, sw, 1.0), 0.0)
    shift = np.concatenate([[0.0], 2 * np.pi * np.round(mean / (2 * np.pi))]).astype(np.float32)
    return unwrapped - shift[labels]


def unwrap_echoes(magnitude: np.ndarray, phase: np.ndarray, echo_times: Sequence[float],
                  mask: np.ndarray | None = None, *, method: str = "romeo",
                  phase_offset: np.ndarray | None = None,
                  voxel_size: Sequence[float] = (1.0, 1.0, 1.0)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Unwrap multi-echo phase in space and time (offset-free result).

    The phase offset φ0 (MCPC-3D-S unless given) is removed from every echo; echo 1
    (fewest wraps) is unwrapped in space — ``"romeo"``: region growing with ROMEO's edge
    weights including echo 2's phase-gradient coherence; ``"laplacian"``: FFT Laplacian
    unwrapping — each connected part of the mask is brought to a mean within ±π of 0
    (the scanner centres the frequency on the tissue), and the other echoes are unwrapped
    in time against ``φ_j·TE_k/TE_j`` from their unwrapped neighbour.

    Returns
    -------
    unwrapped : ndarray, shape (E, X, Y, Z), float32
        Unwrapped phase minus φ0 [rad] (≈ ω·TE); input values outside the mask.
    phase_offset : ndarray, shape (X, Y, Z), float32
        The φ0 removed [rad].
    """
    mag, ph, tes = _echoes(magnitude, phase, echo_times)
    m = _mask_u8(mask, mag.shape[1:])
    if method not in ("romeo", "laplacian"):
        raise ValueError(f"unknown unwrapping {method!r} (choose romeo or laplacian)")
    if phase_offset is None:
        phase_offset = mcpc3ds_phase_offset(mag, ph, tes, m, voxel_size=voxel_size)
    phi0 = np.asarray(phase_offset, np.float32)
    centred = _wrap32(ph - phi0[None])
    if method == "romeo":
        first = _core.unwrap_romeo(centred[0], mag[0], m, centred[1], tes[0] / tes[1])
    else:
        first, _ = _core.unwrap_laplacian(centred[0], m)
    first = _centre_parts(first, mag[0], m != 0)
    out = _core.unwrap_echoes_temporal(centred, list(tes), np.ascontiguousarray(first), 0)
    return out, phi0


def estimate_field(magnitude: np.ndarray, phase: np.ndarray, echo_times: Sequence[float],
                   mask: np.ndarray | None = None, *, field_strength: float,
                   unwrapping: str = "romeo", phase_unwrapped: bool = False,
                   complex_fit: bool = True, phase_offset: str = DEFAULT_PHASE_OFFSET,
                   voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                   max_iter: int = 20) -> FieldEstimate:
    """Total field, its noise SD and the phase quality from multi-echo GRE data.

    Parameters
    ----------
    magnitude, phase : ndarray, shape (E, X, Y, Z)
        Magnitude and phase [rad] (wrapped, or unwrapped with ``phase_unwrapped``).
    echo_times : sequence of float
        Echo times [s], E ≥ 2, increasing.
    mask : ndarray, shape (X, Y, Z), optional
        Voxels to fit (default all); NaN outside.
    field_strength : float
        B0 [T].
    unwrapping : {"romeo", "laplacian", "echodiff"}
        Spatial unwrapping (see :data:`UNWRAPPING_METHODS`); ignored with
        ``phase_unwrapped``.
    phase_unwrapped : bool
        The phase is already unwrapped (e.g. by another tool): only fit it (always
        with a free intercept).
    complex_fit : bool
        Refine the linear fit by the nonlinear magnitude-weighted complex fit.
    phase_offset : {"smoothed", "fitted", "fixed"}
        How the fit treats φ0 (see :data:`PHASE_OFFSET_METHODS`). ``"fitted"``: a free
        intercept per voxel; ``"smoothed"`` (default): that φ0, smoothed with
        :func:`alsiron.field.phase_offset.smooth_local_linear` (σ
        :func:`offset_sigma_mm`), then held fixed while ω is fitted again; ``"fixed"``:
        φ0 held at the MCPC-3D-S estimate (or the echo pair's for "echodiff").
    voxel_size : 3 floats
        Voxel edges [mm] (MCPC-3D-S and φ0 smoothing).
    max_iter : int
        Gauss–Newton iterations of the complex fit (1-255).

    Returns
    -------
    FieldEstimate
    """
    mag, ph, tes = _echoes(magnitude, phase, echo_times)
    omega_to_ppm(np.zeros(1), field_strength)
    if phase_offset not in PHASE_OFFSET_METHODS:
        raise InvalidInputError(f"unknown phase_offset {phase_offset!r} (choose "
                                f"{', '.join(PHASE_OFFSET_METHODS)})")
    m = _mask_u8(mask, mag.shape[1:])
    method: dict = {}
    # A φ0 held at the MCPC-3D-S estimate carries that estimate's error into ω
    # (δω = δφ0·Σw·TE/Σw·TE²), and a Gaussian-smoothed φ0 is biased where the mask cuts
    # the kernel: 15-23 % field NRMSE on qsm-forward's phantom. A free intercept has no
    # such bias but absorbs the TE-nonlinear phase of mixed voxels (partial volume,
    # vessels); its smoothed φ0, held fixed, keeps both right (docs/field.md).
    fixed_offset = phase_offset == "fixed" and not phase_unwrapped
    smoothed = phase_offset == "smoothed" and not phase_unwrapped
    tes_list = list(tes)
    reference = None
    if phase_unwrapped:
        omega, phi0 = _core.fit_field_linear(mag, ph, tes_list, m)
        method["PhaseUnwrapping"] = "input phase already unwrapped"
    elif unwrapping == "echodiff":
        omega, phi0, _ = _core.fit_multi_echo_field(mag, ph, tes_list, m)
        method["PhaseUnwrapping"] = UNWRAPPING_METHODS["echodiff"]
        if not fixed_offset:
            omega, phi0 = _line_fit(mag, ph, tes, m, omega, phi0, free=True)
        if smoothed:
            reference = mcpc3ds_phase_offset(mag, ph, tes, m, voxel_size=voxel_size)
    else:
        unwrapped, reference = unwrap_echoes(mag, ph, tes, m, method=unwrapping,
                                             voxel_size=voxel_size)
        omega, intercept = _core.fit_field_linear(mag, unwrapped, tes_list, m, fixed_offset)
        del unwrapped
        phi0 = reference if fixed_offset else _wrap32(reference + np.nan_to_num(intercept))
        method["PhaseUnwrapping"] = UNWRAPPING_METHODS[unwrapping]
        method["PhaseOffsetRemoval"] = {"Method": "MCPC-3D-S (Eckstein et al. MRM 2018)",
                                        "SmoothingSigma_mm": MCPC_SIGMA_MM}
    wrapped = _wrap32(ph) if phase_unwrapped else ph
    # With "smoothed", the φ0 to be smoothed comes from the linear fit: its noise is
    # averaged away, and one complex fit (the final one, φ0 fixed) is spared.
    omega, phi0, residual, sd_unit, sigma_v = _fit(
        mag, wrapped, tes, m, omega, phi0, complex_fit=complex_fit and not smoothed,
        max_iter=max_iter, fixed_offset=fixed_offset)
    if smoothed:
        phi0 = _smoothed_offset(phi0, reference, residual, mag, m != 0, voxel_size)
        if not complex_fit:
            omega, _ = _line_fit(mag, wrapped, tes, m, omega, phi0, free=False)
        omega, phi0, residual, sd_unit, sigma_v = _fit(
            mag, wrapped, tes, m, omega, phi0, complex_fit=complex_fit, max_iter=max_iter,
            fixed_offset=True)
    offset_name = "fixed" if fixed_offset else ("smoothed" if smoothed else "fitted")
    offset_text = PHASE_OFFSET_METHODS[offset_name]
    if smoothed:
        offset_text += (f" (σ {offset_sigma_mm(voxel_size):g} mm, {OFFSET_PASSES} "
                        "passes)")
    method["PhaseOffset"] = offset_name
    method["EchoCombination"] = (
        ("nonlinear complex fit S = m·exp(i(φ0 + ω·TE)), magnitude-weighted, Gauss-Newton"
         if complex_fit else "magnitude²-weighted linear fit of unwrapped phase over TE")
        + f"; {offset_text}")
    omega = np.where(m != 0, omega, np.float32(np.nan)).astype(np.float32)
    # The smoothed φ0 is fitted from many voxels: one parameter per voxel, as if fixed.
    n_params = 2 if offset_name == "fitted" else 1
    noise_sigma = _global_noise_sigma(sigma_v, m != 0, len(tes) - n_params)
    ppm = omega_to_ppm(omega, field_strength)
    sd_ppm = omega_to_ppm(sd_unit * np.float32(noise_sigma), field_strength)
    method["NoiseSigma"] = noise_sigma
    return FieldEstimate(field_ppm=ppm, field_sd_ppm=sd_ppm, omega=omega,
                         phase_offset=np.asarray(phi0, np.float32), residual=residual,
                         noise_sigma=noise_sigma, method=method)


def _fit(mag: np.ndarray, wrapped: np.ndarray, tes: tuple[float, ...], m: np.ndarray,
         omega: np.ndarray, phi0: np.ndarray, *, complex_fit: bool, max_iter: int,
         fixed_offset: bool) -> tuple[np.ndarray, ...]:
    """The complex fit from (ω [rad/s], φ0 [rad]), or only its residual and noise maps
    at the linear estimate (its updated ω discarded); returns (ω, φ0, residual [rad],
    sd(ω)/σ, σ̂ per voxel)."""
    phi0 = np.ascontiguousarray(np.nan_to_num(phi0), np.float32)
    omega = np.ascontiguousarray(omega, np.float32)
    if complex_fit:
        omega, phi0, residual, sd_unit, sigma_v, _ = _core.fit_field_complex(
            mag, wrapped, list(tes), m, omega, phi0, max_iter, 1e-4, fixed_offset)
    else:
        _, _, residual, sd_unit, sigma_v, _ = _core.fit_field_complex(
            mag, wrapped, list(tes), m, omega, phi0, 1, 1e-4, fixed_offset)
    return omega, phi0, residual, sd_unit, sigma_v


def _smoothed_offset(phi0: np.ndarray, reference: np.ndarray, residual: np.ndarray,
                     mag: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float]
                     ) -> np.ndarray:
    """The fitted φ0 [rad] smoothed around the smooth ``reference`` [rad] (its
    difference has no wraps), each voxel weighted by its signal energy Σm² and down by
    its phase residual [rad] (mixed voxels bend the phase and bias their intercept)."""
    from alsiron.field.phase_offset import smooth_local_linear

    diff = _wrap32(np.nan_to_num(phi0) - reference)
    energy = np.einsum("e...,e...->...", mag, mag, dtype=np.float32)
    res = np.where(np.isfinite(residual), residual, np.float32(np.inf))
    weight = energy / (1.0 + (res / np.float32(OFFSET_RESIDUAL_SCALE)) ** 2)
    corr = smooth_local_linear(diff, weight, mask, voxel_size=voxel_size,
                               sigma_mm=offset_sigma_mm(voxel_size), passes=OFFSET_PASSES)
    return np.ascontiguousarray(_wrap32(reference + corr), np.float32)


def offset_sigma_mm(voxel_size: Sequence[float]) -> float:
    """σ [mm] of the φ0 smoothing ("smoothed") for voxels of ``voxel_size`` [mm]."""
    return max(OFFSET_SIGMA_MM, OFFSET_SIGMA_VOXELS * max(float(v) for v in voxel_size))


def _line_fit(mag: np.ndarray, ph: np.ndarray, tes: tuple[float, ...], m: np.ndarray,
              omega: np.ndarray, phi0: np.ndarray, *, free: bool
              ) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude²-weighted linear fit of the echoes unwrapped in time against the line
    ``φ0 + ω·TE`` (ω [rad/s], φ0 [rad]): with a free intercept, or through φ0.
    Returns the new (ω, φ0)."""
    omega = np.nan_to_num(omega).astype(np.float32)
    phi0 = np.nan_to_num(phi0).astype(np.float32)
    unwrapped = np.empty_like(ph)
    for k, te in enumerate(tes):
        model = omega * np.float32(te)
        unwrapped[k] = model + _wrap32(ph[k] - phi0 - model)
    omega, intercept = _core.fit_field_linear(mag, unwrapped, list(tes), m, not free)
    if not free:
        return omega, phi0
    return omega, _wrap32(phi0 + np.nan_to_num(intercept))


def _global_noise_sigma(sigma_voxel: np.ndarray, mask: np.ndarray, dof: int) -> float:
    """Complex noise σ from per-voxel residual estimates (``dof`` degrees of freedom
    each): the median of σ̂² over the mask divided by the χ²_ν median/ν, so outliers
    (vessels, edges) do not inflate it."""
    if dof < 1:
        return float("nan")
    from scipy.special import gammaincinv  # scipy.stats costs ~1.5 s to import

    v = sigma_voxel[mask & np.isfinite(sigma_voxel)].astype(np.float64) ** 2
    if v.size == 0:
        return float("nan")
    chi2_median = 2.0 * float(gammaincinv(dof / 2.0, 0.5))
    return float(np.sqrt(np.median(v) / (chi2_median / dof)))

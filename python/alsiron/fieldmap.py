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
        raise ValueError(f"got {tes.size} echo times for {n_echoes} echoes")
    if n_echoes < minimum:
        raise ValueError(f"need at least {minimum} echoes, got {n_echoes}")
    if not np.all(np.isfinite(tes)) or np.any(tes < 0):
        raise ValueError(f"echo times must be finite non-negative seconds, got {tes.tolist()}")
    if np.any(np.diff(tes) <= 0):
        raise ValueError(f"echo times must be strictly increasing, got {tes.tolist()}")
    if tes[-1] > 1.0:
        raise ValueError(f"echo times look like milliseconds ({tes.tolist()}); give seconds")
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
        raise ValueError(f"field_strength must be a positive number of tesla, got {field_strength}")
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

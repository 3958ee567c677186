"""Numerical head phantom: multi-echo GRE data with ground truth, and a BIDS writer.

The recipe (geometry, tissue values, forward model, noise, cohort) is documented in
``phantoms/README.md``.  In short: tissue labels are drawn on a grid ``supersampling``
times finer than the output, property maps are looked up from
``alsiron/data/head_tissues.tsv``, the field is the dipole convolution of the
susceptibility on that fine grid, zero-padded (air) against wrap-around, and the complex
signal of every echo is averaged down to the output grid before complex Gaussian noise
is added.  Data and ground truth therefore never share a discretisation with the
inversions that are tested on them.

Axes: the volume axes (i, j, k) point to the subject's right, anterior and superior
in the head frame; the affine rotates this frame so that the requested B0 direction
(given in voxel-index space) is world z.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.fft

import alsiron
from alsiron.arrays import as_voxel_size
from alsiron.constants import GAMMA_BAR_HZ_PER_T
from alsiron.errors import InvalidInputError
from alsiron.io.atomic import save_json, save_nifti, save_text
from alsiron.sim.geometry import head_labels
from alsiron.sim.tissues import (
    DEEP_GREY_LABELS,
    LABELS,
    PRECENTRAL_DEEP_LABELS,
    PRECENTRAL_LABELS,
    TISSUES,
)

log = logging.getLogger("alsiron")

#: Output matrix of one subject-session by default (voxels per axis).
DEFAULT_MATRIX = 96
#: Output voxel edge by default, mm.
DEFAULT_VOXEL_SIZE_MM = 2.0
#: Echo-1 white-matter SNR by default.
DEFAULT_SNR = 100.0
#: Six echoes, TE1 = 4 ms, ΔTE = 5 ms (seconds).
DEFAULT_ECHO_TIMES_S = (0.004, 0.009, 0.014, 0.019, 0.024, 0.029)
#: Repetition time and flip angle written to the sidecars (not used by the signal model).
REPETITION_TIME_S = 0.035
FLIP_ANGLE_DEG = 15.0
#: Repetition time written to the MESE sidecars (the signal model assumes full recovery).
MESE_REPETITION_TIME_S = 3.0
#: Field of view (mm, smallest axis) at which the reference head is drawn at true size;
#: smaller fields of view shrink the head uniformly.
REFERENCE_FOV_MM = 192.0
SUPERSAMPLING = 2
#: Zero (air) padding of the fine grid before the FFT, as a factor of its size.
PAD_FACTOR = 1.25

#: Whole-precentral mean χ excess of ALS over controls at baseline, ppm (≈ 3 ppb:
#: controls 27-30 ppb vs ALS 30-33 ppb in M1 at 3 T, Bhattarai 2020).
DEFAULT_ALS_EFFECT_PPM = 0.003
#: Yearly growth of that excess, ppm/year (1 ppb per 6 months: below the 6.5 ppb
#: same-scanner MDC95, consistent with "no change detected over 6 months").
DEFAULT_ALS_PROGRESSION_PPM_PER_YEAR = 0.002
#: R2* change per ppm of χ change in the precentral and deep-grey labels (iron).
R2STAR_PER_CHI = 120.0
#: Between-subject SD of the precentral mean χ (ppm): 3 ppb / 0.9, so that Cohen's d of
#: the default effect is 0.9.  Age and site terms below are part of this SD.
PRECENTRAL_BETWEEN_SUBJECT_SD_PPM = 0.003 / 0.9
#: Cortical χ rises with age: precentral slope, ppm/year, centred at 57.5 years.
PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR = 0.00008
AGE_CENTRE_YEARS = 57.5
AGE_RANGE_YEARS = (40.0, 75.0)
#: site-02 reads precentral χ 1 ppb higher than site-01 (a harmonisation target).
SITE_OFFSET_PPM = {"site-01": 0.0, "site-02": 0.001}
#: Between-subject SD of the deep-grey χ scale factor (relative).
DEEP_GREY_SCALE_SD = 0.08
#: Mean and jitter of the interval between sessions, days.
SESSION_INTERVAL_DAYS = 182.0
SESSION_JITTER_DAYS = 14.0

Group = Literal["control", "ALS"]


@dataclass(frozen=True)
class MeseProtocol:
    """Multi-echo spin-echo (CPMG) acquisition simulated beside the MEGRE.

    Attributes
    ----------
    n_echoes : int
        Number of echoes; echo k at k·``echo_spacing``.
    echo_spacing : float
        Echo spacing [s].
    refocusing_angle : float
        Nominal refocusing flip angle [degrees]; the actual angle is B1 times it.
    t1 : float
        T1 [s] of the stimulated-echo pathways (one value for all tissues).
    b1_centre, b1_curvature, b1_tilt : float
        Smooth transmit field B1(u) = centre − curvature·|u|² + tilt·u_x with u the
        position in units of the half field of view (a centre-bright pattern as at 3 T).
    """

    n_echoes: int = 16
    echo_spacing: float = 0.01
    refocusing_angle: float = 160.0
    t1: float = 1.0
    b1_centre: float = 1.02
    b1_curvature: float = 0.2
    b1_tilt: float = 0.04

    def parameters(self) -> dict[str, Any]:
        """The protocol as recorded in the truth sidecars' ``PhantomParameters``."""
        return {"n_echoes": self.n_echoes, "echo_spacing_s": self.echo_spacing,
                "refocusing_angle_deg": self.refocusing_angle, "t1_s": self.t1,
                "b1": [self.b1_centre, self.b1_curvature, self.b1_tilt]}

    def b1_field(self, unit_coords: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """B1 scale on a grid given its coordinates in half-field-of-view units."""
        ux, uy, uz = unit_coords
        return (self.b1_centre - self.b1_curvature * (ux ** 2 + uy ** 2 + uz ** 2)
                + self.b1_tilt * ux).astype(np.float32)


@dataclass
class PhantomSession:
    """One simulated subject-session: multi-echo GRE data and its ground truth.

    All volumes share the output grid (X, Y, Z) and ``affine``.

    Attributes
    ----------
    magnitude : ndarray, float32, shape (E, X, Y, Z)
        Noisy echo magnitudes (arbitrary units, CSF proton density = 1).
    phase : ndarray, float32, shape (E, X, Y, Z)
        Noisy echo phases in radians within (-pi, pi].
    echo_times : ndarray, float64, shape (E,)
        Echo times in seconds.
    field_strength : float
        B0 in tesla.
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform (mm); its rotation puts ``b0_direction`` on world z.
    voxel_size : tuple of 3 floats
        Voxel edge lengths in mm.
    b0_direction : ndarray, shape (3,)
        Unit B0 direction in voxel-index space.
    chi : ndarray, float32
        Brain-tissue susceptibility, ppm, mean zero over ``brain_mask``, 0 outside.
    chi_full : ndarray, float32
        Susceptibility of everything (air +9.4, bone -2 ppm) relative to the table's
        tissue reference (not demeaned).
    r2star, r2 : ndarray, float32
        Relaxation rates in s⁻¹ (voxel averages of the fine-grid rates).
    s0 : ndarray, float32
        Proton density M0 (the signal at TE = 0 before noise).
    brain_mask : ndarray, bool
        Intracranial volume (inner skull surface), voxels at least half inside.
    labels : ndarray, uint8
        Tissue labels (majority of the fine sub-voxels); names in ``label_names``.
    total_field : ndarray, float32
        Field of all sources (air, bone, tissue), ppm, over the whole field of view.
    local_field : ndarray, float32
        Field of ``chi`` alone (brain tissue, demeaned), ppm, 0 outside ``brain_mask``.
    phase_offset : ndarray, float32
        Smooth echo-independent phase φ0 in radians (not wrapped).
    noise_sigma : float
        Standard deviation of the real and of the imaginary noise (0 when noiseless).
    label_names : dict of int to str
        Name of every label value.
    parameters : dict
        Every parameter that made this session (written to the truth sidecars).
    mese_magnitude : ndarray, float32, shape (E', X, Y, Z), or None
        Multi-echo spin-echo magnitudes (same grid; Rician noise of the same σ) when a
        :class:`MeseProtocol` was given: the label-fraction-weighted sum of M0·EPG echo
        trains of each tissue's T2 at the voxel's B1.
    mese_echo_times : ndarray or None
        Spin-echo times [s].
    mese_protocol : MeseProtocol or None
    b1 : ndarray, float32, or None
        Refocusing-angle scale (actual/nominal) of the MESE.
    extra_truth : list of (suffix, array, sidecar)
        More truth maps written beside the others (the anatomical phantom's precentral
        masks and somatotopy).
    fine_labels : (ndarray uint8, ndarray (4, 4)) or None
        The tissue labels on the simulation's fine grid and its affine, written as
        ``res-fine_dseg``: what a segmentation of a higher-resolution T1w gives beside
        the maps.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    echo_times: np.ndarray
    field_strength: float
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    b0_direction: np.ndarray
    chi: np.ndarray
    chi_full: np.ndarray
    r2star: np.ndarray
    r2: np.ndarray
    s0: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    total_field: np.ndarray
    local_field: np.ndarray
    phase_offset: np.ndarray
    noise_sigma: float
    label_names: dict[int, str] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    mese_magnitude: np.ndarray | None = None
    mese_echo_times: np.ndarray | None = None
    mese_protocol: MeseProtocol | None = None
    b1: np.ndarray | None = None
    extra_truth: list[tuple[str, np.ndarray, dict[str, Any]]] = field(default_factory=list)
    fine_labels: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def complex_echoes(self) -> np.ndarray:
        """Complex echoes ``magnitude * exp(i phase)``, complex64, shape (E, X, Y, Z)."""
        return (self.magnitude * np.exp(1j * self.phase)).astype(np.complex64)


# --------------------------------------------------------------------------- geometry


def _one_or_three(value: float | tuple[float, float, float] | list[float], name: str
                  ) -> tuple[float, float, float]:
    return as_voxel_size(value, name, one_for_all=True,
                         message=f"{name} must be one positive number or three, got {value!r}")


def _as_matrix(value: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    arr = np.asarray(_one_or_three(value, "matrix"))
    if np.any(arr != np.round(arr)) or np.any(arr < 8):
        raise InvalidInputError(f"matrix must be whole numbers >= 8, got {value!r}")
    return (int(arr[0]), int(arr[1]), int(arr[2]))


def rotation_to_b0(b0_direction: np.ndarray) -> np.ndarray:
    """Rotation R (3x3) with ``R @ b0_direction = (0, 0, 1)``: the smallest such turn.

    With the voxel axes mapped to world by R, B0 along world z appears as
    ``R.T @ (0, 0, 1) = b0_direction`` in voxel space.
    """
    b = np.asarray(b0_direction, np.float64)
    b = b / np.linalg.norm(b)
    z = np.array([0.0, 0.0, 1.0])
    cos = float(b @ z)
    axis = np.cross(b, z)
    sin = float(np.linalg.norm(axis))
    if sin < 1e-12:
        return np.eye(3) if cos > 0 else np.diag([1.0, -1.0, -1.0])
    axis /= sin
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + sin * k + (1 - cos) * (k @ k)


def phantom_affine(matrix: tuple[int, int, int], voxel_size: tuple[float, float, float],
                   b0_direction: np.ndarray) -> np.ndarray:
    """Voxel-to-world affine of the phantom grid (world origin at the grid centre, mm)."""
    rot = rotation_to_b0(b0_direction)
    lin = rot @ np.diag(voxel_size)
    centre = (np.asarray(matrix, np.float64) - 1.0) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = -lin @ centre
    return affine


# ----------------------------------------------------------------------- forward model


def dipole_field_ppm(chi_ppm: np.ndarray, voxel_size: tuple[float, float, float],
                     b0_direction: np.ndarray, *, pad_factor: float = PAD_FACTOR
                     ) -> np.ndarray:
    """Field (ppm of B0) of a susceptibility map by k-space dipole convolution.

    D(k) = 1/3 - (k·b)²/|k|² with k in cycles/mm along the voxel axes, D(0) = 0; the
    map is zero-padded to ``pad_factor`` times its size (fast FFT sizes) so that
    periodic copies stay far away, and the result is cropped back.

    Parameters
    ----------
    chi_ppm : ndarray, shape (X, Y, Z)
        Susceptibility in ppm; the padding value is 0 (air when χ is air-referenced).
    voxel_size : tuple of 3 floats
        Voxel edges in mm.
    b0_direction : array-like, shape (3,)
        B0 direction in voxel-index space (normalised here).

    Returns
    -------
    ndarray, float32, shape (X, Y, Z)
    """
    shape = chi_ppm.shape
    padded = tuple(scipy.fft.next_fast_len(int(math.ceil(n * pad_factor)), real=True)
                   for n in shape)
    b = np.asarray(b0_direction, np.float64)
    b = b / np.linalg.norm(b)
    kx = np.fft.fftfreq(padded[0], d=voxel_size[0]).astype(np.float32)[:, None, None]
    ky = np.fft.fftfreq(padded[1], d=voxel_size[1]).astype(np.float32)[None, :, None]
    kz = np.fft.rfftfreq(padded[2], d=voxel_size[2]).astype(np.float32)[None, None, :]
    kb = kx * np.float32(b[0]) + ky * np.float32(b[1]) + kz * np.float32(b[2])
    k2 = kx * kx + ky * ky + kz * kz
    k2[0, 0, 0] = 1.0
    kernel = np.float32(1.0 / 3.0) - kb * kb / k2
    kernel[0, 0, 0] = 0.0
    spectrum = scipy.fft.rfftn(np.asarray(chi_ppm, np.float32), s=padded, workers=-1)
    spectrum *= kernel
    field_ppm = scipy.fft.irfftn(spectrum, s=padded, workers=-1)
    return np.ascontiguousarray(field_ppm[: shape[0], : shape[1], : shape[2]], np.float32)


def _block_mean(fine: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor³ blocks of the trailing three axes.

    Summed one axis at a time from strided slices, which is several times faster than
    a mean over a 6-D reshaped view.
    """
    out = fine
    for axis in (-3, -2, -1):
        parts = [out[(Ellipsis, slice(i, None, factor)) + (slice(None),) * (-axis - 1)]
                 for i in range(factor)]
        total = parts[0].astype(np.result_type(out.dtype, np.float32), copy=True)
        for part in parts[1:]:
            total += part
        out = total
    return out / np.float32(factor**3)


def _block_majority(labels: np.ndarray, factor: int) -> np.ndarray:
    """Most frequent label of each factor³ block (ties go to the lower label)."""
    nx, ny, nz = (s // factor for s in labels.shape)
    cols = labels.reshape(nx, factor, ny, factor, nz, factor).transpose(0, 2, 4, 1, 3, 5)
    cols = cols.reshape(nx * ny * nz, factor**3)
    n = cols.shape[1]
    best_score = np.full(cols.shape[0], -1, np.int32)
    best = np.zeros(cols.shape[0], np.uint8)
    for c in range(n):
        count = np.zeros(cols.shape[0], np.int32)
        for j in range(n):
            count += cols[:, c] == cols[:, j]
        # Higher count wins; among equal counts the lower label value.
        score = count * 256 + (255 - cols[:, c].astype(np.int32))
        better = score > best_score
        best_score[better] = score[better]
        best[better] = cols[better, c]
    return best.reshape(nx, ny, nz)


def _phase_offset(rng: np.random.Generator, coords: tuple[np.ndarray, ...]) -> np.ndarray:
    """Smooth φ0: constant U(-π, π) + linear N(0, 0.8) + quadratic N(0, 0.4) rad terms."""
    u, v, w = coords
    const = rng.uniform(-np.pi, np.pi)
    lin = rng.normal(0.0, 0.8, 3)
    quad = rng.normal(0.0, 0.4, 6)
    return (const + lin[0] * u + lin[1] * v + lin[2] * w + quad[0] * u * u + quad[1] * v * v
            + quad[2] * w * w + quad[3] * u * v + quad[4] * u * w + quad[5] * v * w
            ).astype(np.float32)


def _coerce_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def precentral_deep_fraction(labels: np.ndarray) -> float:
    """Volume fraction of the deep layer within the precentral cortex labels."""
    deep = np.isin(labels, PRECENTRAL_DEEP_LABELS).sum()
    total = np.isin(labels, PRECENTRAL_LABELS).sum()
    return float(deep) / float(max(total, 1))


def _checked_acquisition(echo_times: Sequence[float], field_strength: float,
                         b0_direction: Sequence[float], group: str, snr: float | None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Echo times [s] as float64 and the unit B0 direction, after checking every
    acquisition argument of :func:`simulate_subject`."""
    tes = np.asarray(echo_times, np.float64)
    if tes.ndim != 1 or tes.size < 1 or np.any(~np.isfinite(tes)) or np.any(tes <= 0) \
            or np.any(np.diff(tes) <= 0):
        raise ValueError(f"echo_times must be positive, increasing seconds, got {echo_times!r}")
    if not (np.isfinite(field_strength) and field_strength > 0):
        raise InvalidInputError(f"field_strength must be positive tesla, got {field_strength!r}")
    b0 = np.asarray(b0_direction, np.float64)
    if b0.shape != (3,) or not np.all(np.isfinite(b0)) or np.linalg.norm(b0) == 0:
        raise InvalidInputError("b0_direction must be 3 finite numbers, not all 0: "
                                f"{b0_direction!r}")
    b0 = b0 / np.linalg.norm(b0)
    if group not in ("control", "ALS"):
        raise ValueError(f"group must be 'control' or 'ALS', got {group!r}")
    if snr is not None and not (snr > 0):
        raise InvalidInputError(f"snr must be positive (or None for noiseless), got {snr!r}")
    return tes, b0


def _subject_tables(labels_fine: np.ndarray, group: str, als_effect_ppm: float,
                    als_progression_ppm_per_year: float, years_since_baseline: float,
                    precentral_offset_ppm: float, deep_grey_chi_scale: float,
                    r2star_per_chi: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-label χ [ppm] and R2* [s⁻¹] of one subject (arguments as in
    :func:`simulate_subject`): the tissue table with its deep-grey scale, precentral
    offset and, for ALS, the excess placed in the deep precentral layer (of the fine
    ``labels_fine``); R2* follows the χ changes.  Also the subject's entries of the
    session parameters, in their sidecar order."""
    deep_fraction = precentral_deep_fraction(labels_fine)
    als_excess = 0.0
    if group == "ALS":
        als_excess = als_effect_ppm + als_progression_ppm_per_year * years_since_baseline
    chi_tab = TISSUES.chi_ppm.copy()
    r2s_tab = TISSUES.r2star_per_s.copy()
    deep_grey = np.array(DEEP_GREY_LABELS)
    chi_tab[deep_grey] *= deep_grey_chi_scale
    precentral = np.array(PRECENTRAL_LABELS)
    chi_tab[precentral] += precentral_offset_ppm
    if group == "ALS" and deep_fraction > 0:
        chi_tab[np.array(PRECENTRAL_DEEP_LABELS)] += als_excess / deep_fraction
    changed = np.concatenate([deep_grey, precentral])
    r2s_tab[changed] += r2star_per_chi * (chi_tab[changed] - TISSUES.chi_ppm[changed])
    subject = {"group": group, "als_effect_ppm": als_effect_ppm,
               "als_progression_ppm_per_year": als_progression_ppm_per_year,
               "years_since_baseline": years_since_baseline,
               "als_precentral_excess_ppm": als_excess,
               "precentral_deep_fraction": deep_fraction,
               "precentral_offset_ppm": precentral_offset_ppm,
               "deep_grey_chi_scale": deep_grey_chi_scale, "r2star_per_chi": r2star_per_chi}
    return chi_tab, r2s_tab, subject


def _gre_signal(tes: np.ndarray, field_strength: float, m0_fine: np.ndarray,
                r2s_fine: np.ndarray, phi0_fine: np.ndarray, total_fine: np.ndarray,
                matrix3: tuple[int, int, int], ss: int) -> np.ndarray:
    """Noiseless complex echoes (E, X, Y, Z), complex64: each echo formed on the fine
    grid (M0, R2* [s⁻¹], phase offset [rad], field [ppm] at ``field_strength`` [T])
    and block-averaged by ``ss``."""
    rad_per_ppm_s = 2.0 * np.pi * GAMMA_BAR_HZ_PER_T * field_strength * 1e-6
    signal = np.empty((tes.size, *matrix3), np.complex64)
    for e, te in enumerate(tes):
        mag = m0_fine * np.exp(np.float32(-te) * r2s_fine)
        ph = phi0_fine + np.float32(rad_per_ppm_s * te) * total_fine
        fine_echo = np.empty(m0_fine.shape, np.complex64)
        fine_echo.real = mag * np.cos(ph)
        fine_echo.imag = mag * np.sin(ph)
        signal[e] = _block_mean(fine_echo, ss)
    return signal


def _add_noise(signal: np.ndarray, labels: np.ndarray, snr: float | None,
               gen: np.random.Generator) -> float:
    """Add complex Gaussian noise in place so that echo 1 has ``snr`` in white matter;
    returns σ per channel (0 for noiseless)."""
    wm = labels == LABELS["white_matter"]
    signal_wm = float(np.abs(signal[0][wm]).mean()) if wm.any() else float(
        np.abs(signal[0]).max())
    sigma = 0.0 if snr is None or not np.isfinite(snr) else signal_wm / float(snr)
    if sigma > 0:
        noise = gen.standard_normal((2, *signal.shape), dtype=np.float32) * np.float32(sigma)
        signal += noise[0] + 1j * noise[1]
    return sigma


def _fine_head(matrix3: tuple[int, int, int], voxel3: tuple[float, float, float], ss: int
               ) -> tuple[tuple[float, ...], float, tuple[np.ndarray, ...], np.ndarray,
                          np.ndarray]:
    """The head drawn on the ``ss``-times supersampled grid.

    Returns the fine voxel size [mm], the head scale (1 = true size), the axis
    coordinates in units of the half field of view, the labels and the intracranial mask.
    """
    fine_shape = tuple(n * ss for n in matrix3)
    fine_voxel = tuple(v / ss for v in voxel3)
    fov = np.array(matrix3) * np.array(voxel3)
    scale = min(1.0, float(fov.min()) / REFERENCE_FOV_MM)
    axes = tuple(((np.arange(n) + 0.5) * h - f / 2.0)
                 for n, h, f in zip(fine_shape, fine_voxel, fov, strict=True))
    labels_fine, ic_fine = head_labels(*(a / scale for a in axes))
    unit = tuple(a / (f / 2.0) for a, f in zip(axes, fov, strict=True))
    return fine_voxel, scale, unit, labels_fine, ic_fine


def _fine_fields(chi_fine: np.ndarray, ic_fine: np.ndarray, fine_voxel: tuple[float, ...],
                 b0: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Total field [ppm] of the whole head (air as zero), the intracranial χ [ppm] with
    its mean removed, that mean (table χ over the intracranial volume) and its local
    field [ppm]."""
    # Air is the zero of the simulation so that zero padding is air.
    chi_air_ref = chi_fine - np.float32(TISSUES.chi_ppm[LABELS["air"]])
    total_fine = dipole_field_ppm(chi_air_ref, fine_voxel, b0)
    del chi_air_ref
    chi_brain_fine = np.where(ic_fine, chi_fine, np.float32(0.0))
    brain_mean_table = float(chi_brain_fine[ic_fine].mean(dtype=np.float64))
    chi_brain_fine[ic_fine] -= brain_mean_table
    local_fine = dipole_field_ppm(chi_brain_fine, fine_voxel, b0)
    return total_fine, chi_brain_fine, brain_mean_table, local_fine


#: Terms of a 2nd-order spherical-harmonic B0 shim (0th, 1st and 2nd order: 9 terms),
#: as polynomials in head-frame coordinates; every one is harmonic (zero Laplacian).
SHIM_TERMS = ("1", "x", "y", "z", "xy", "xz", "yz", "x2-y2", "2z2-x2-y2")
#: Length unit of the shim polynomials (coefficients are ppm per SHIM_UNIT_MM^order).
SHIM_UNIT_MM = 100.0
#: One sample per SHIM_STRIDE fine voxels along each axis enters the shim fit (the
#: scanner fits a coarse field map too).
SHIM_STRIDE = 4


def shim_basis(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
    """The :data:`SHIM_TERMS` at head-frame coordinates x, y, z [SHIM_UNIT_MM], in that
    order (arrays of one shape, or open grids that broadcast together)."""
    return [np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
            2 * z * z - x * x - y * y]


def apply_shim(total_fine: np.ndarray, region_fine: np.ndarray,
               axes_mm: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """Shim the field as a scanner does: subtract, in place, the least-squares fit of
    the 2nd-order spherical harmonics (:data:`SHIM_TERMS`) to ``total_fine`` [ppm] over
    ``region_fine`` (the brain).

    The fit is done in head-frame coordinates: the span of the harmonic polynomials of
    degree <= 2 is invariant under rotations and translations, so the shim equals the one
    fitted in the scanner frame for any B0 direction.  The shim field is harmonic, so it
    is a background field: the local field of the brain's own sources is unchanged.

    Parameters
    ----------
    total_fine : ndarray, float32
        Total field [ppm] on the fine grid; shimmed in place.
    region_fine : ndarray, bool
        Where the shim is fitted (the intracranial volume).
    axes_mm : 3 arrays
        Fine-grid axis coordinates [mm], origin at the field-of-view centre.

    Returns
    -------
    dict
        The shim as recorded in ``PhantomParameters["b0_shim"]``: terms, coefficients
        (ppm per SHIM_UNIT_MM^order, origin at the field-of-view centre) and the field SD
        over the region before and after [ppm].
    """
    u = [a / np.float32(SHIM_UNIT_MM) for a in axes_mm]
    pick = tuple(slice(SHIM_STRIDE // 2, None, SHIM_STRIDE) for _ in range(3))
    sample = region_fine[pick]
    pts = np.nonzero(sample)
    if pts[0].size < len(SHIM_TERMS):
        raise InvalidInputError("the shim region has too few voxels to fit a 2nd-order shim")
    coords = [a[pick[0]][idx].astype(np.float64) for a, idx in zip(u, pts, strict=True)]
    design = np.stack([b.astype(np.float64) for b in shim_basis(*coords)], axis=1)
    target = total_fine[pick][pts].astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    before = float(np.std(target))
    after = float(np.std(target - design @ coef))
    grid = np.ix_(*[np.asarray(a, np.float32) for a in u])
    for c, term in zip(coef, shim_basis(*grid), strict=True):
        total_fine -= np.float32(c) * term
    return {"order": 2, "region": "intracranial volume", "terms": list(SHIM_TERMS),
            "coordinate_unit_mm": SHIM_UNIT_MM, "coefficients_ppm": coef.tolist(),
            "field_sd_in_region_before_ppm": before, "field_sd_in_region_after_ppm": after}


def _brain_truth(ic_fine: np.ndarray, chi_brain_fine: np.ndarray, local_fine: np.ndarray,
                 ss: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain mask, χ truth [ppm] (mean 0 over the mask) and local field [ppm] (0 outside)
    on the output grid."""
    brain_mask = _block_mean(ic_fine.astype(np.float32), ss) >= 0.5
    chi = _block_mean(chi_brain_fine, ss).astype(np.float32)
    chi[~brain_mask] = 0.0
    chi[brain_mask] -= chi[brain_mask].mean(dtype=np.float64)
    local = _block_mean(local_fine, ss).astype(np.float32)
    local[~brain_mask] = 0.0
    return brain_mask, chi, local


def simulate_subject(
    *,
    matrix: int | tuple[int, int, int] = DEFAULT_MATRIX,
    voxel_size: float | tuple[float, float, float] = DEFAULT_VOXEL_SIZE_MM,
    field_strength: float = 3.0,
    snr: float | None = DEFAULT_SNR,
    b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0),
    echo_times: tuple[float, ...] = DEFAULT_ECHO_TIMES_S,
    group: Group = "control",
    als_effect_ppm: float = DEFAULT_ALS_EFFECT_PPM,
    als_progression_ppm_per_year: float = DEFAULT_ALS_PROGRESSION_PPM_PER_YEAR,
    years_since_baseline: float = 0.0,
    precentral_offset_ppm: float = 0.0,
    deep_grey_chi_scale: float = 1.0,
    r2star_per_chi: float = R2STAR_PER_CHI,
    mese: MeseProtocol | None = None,
    rng: np.random.Generator | int | None = None,
) -> PhantomSession:
    """Simulate one multi-echo GRE session of the head phantom with its ground truth.

    Parameters
    ----------
    matrix : int or 3 ints
        Output grid size (voxels); at least 8 per axis.
    voxel_size : float or 3 floats
        Output voxel edges in mm (anisotropic allowed).  The head is drawn at true size
        when the smallest field of view is >= 192 mm and shrunk uniformly otherwise.
    field_strength : float
        B0 in tesla (phase scales with it; relaxation values are the 3 T table's).
    snr : float or None
        Echo-1 SNR in white matter: noise σ (per real/imaginary channel) is the mean
        noiseless echo-1 magnitude over white-matter voxels divided by ``snr``.
        None or inf gives noiseless data.
    b0_direction : 3 floats
        B0 direction in voxel-index space (normalised); the affine is built to match.
    echo_times : sequence of float
        Echo times in seconds, increasing.
    group : {"control", "ALS"}
        ALS adds the precentral deep-layer χ excess.
    als_effect_ppm : float
        ALS excess of the *whole-precentral* mean χ at baseline, ppm; it is placed in the
        deep layer only (deep excess = effect / deep volume fraction).
    als_progression_ppm_per_year : float
        Yearly growth of that excess, ppm/year.
    years_since_baseline : float
        Time of this session after the subject's baseline, years.
    precentral_offset_ppm : float
        Subject-specific χ offset added to all four precentral labels, ppm (between-
        subject variation, age and site terms of the cohort).
    deep_grey_chi_scale : float
        Factor applied to the χ of the deep-grey nuclei (between-subject variation).
    r2star_per_chi : float
        R2* change (s⁻¹) per ppm of χ change in the precentral and deep-grey labels.
    mese : MeseProtocol, optional
        Also simulate a multi-echo spin echo with a smooth B1 field (its noise is drawn
        after the MEGRE noise, so the MEGRE data do not change).
    rng : numpy Generator, int seed or None
        Source of the phase offset and the noise (drawn in that order).

    Returns
    -------
    PhantomSession
    """
    matrix3, voxel3 = _as_matrix(matrix), _one_or_three(voxel_size, "voxel_size")
    tes, b0 = _checked_acquisition(echo_times, field_strength, b0_direction, group, snr)
    gen = _coerce_rng(rng)

    ss = SUPERSAMPLING
    fine_voxel, scale, unit, labels_fine, ic_fine = _fine_head(matrix3, voxel3, ss)

    chi_tab, r2s_tab, subject = _subject_tables(
        labels_fine, group, als_effect_ppm, als_progression_ppm_per_year,
        years_since_baseline, precentral_offset_ppm, deep_grey_chi_scale, r2star_per_chi)
    return forward_session(labels_fine, ic_fine, fine_voxel, unit, chi_tab, r2s_tab,
                           matrix3=matrix3, voxel3=voxel3, ss=ss, echo_times=tes, b0=b0,
                           field_strength=field_strength, snr=snr, gen=gen,
                           parameters=subject, head_scale=scale, mese=mese)


def forward_session(labels_fine: np.ndarray, ic_fine: np.ndarray,
                    fine_voxel: tuple[float, ...], unit: tuple[np.ndarray, ...],
                    chi_tab: np.ndarray, r2s_tab: np.ndarray, *,
                    matrix3: tuple[int, int, int], voxel3: tuple[float, float, float],
                    ss: int, echo_times: np.ndarray, b0: np.ndarray, field_strength: float,
                    snr: float | None, gen: np.random.Generator, parameters: dict[str, Any],
                    head_scale: float, mese: MeseProtocol | None = None,
                    shim: bool = False) -> PhantomSession:
    """The forward model shared by every phantom: fields, echoes, noise and truth from
    tissue labels drawn on a grid ``ss`` times finer than the output.

    Parameters
    ----------
    labels_fine : ndarray, uint8, shape ``ss`` × ``matrix3``
        Tissue labels of :data:`TISSUES` on the fine grid.
    ic_fine : ndarray, bool
        Intracranial volume (brain mask) on the fine grid.
    fine_voxel : 3 floats
        Fine voxel edges [mm].
    unit : 3 arrays
        Fine-grid axis coordinates in units of the half field of view (phase offset, B1).
    chi_tab, r2s_tab : ndarray
        Per-label χ [ppm] and R2* [s⁻¹] of this subject (:func:`_subject_tables`).
    matrix3, voxel3 : output grid size and voxel edges [mm].
    ss : int
        Supersampling factor.
    echo_times : ndarray
        Echo times [s], checked.
    b0 : ndarray
        Unit B0 direction in voxel-index space.
    field_strength : float
        B0 [T].
    snr : float or None
        Echo-1 white-matter SNR (None: noiseless).
    gen : numpy Generator
        Phase offset, then noise (then MESE noise) are drawn from it in that order.
    parameters : dict
        The subject's entries of ``PhantomParameters`` (placed after the acquisition's).
    head_scale : float
        Recorded as ``head_scale``.
    mese : MeseProtocol, optional
        Also simulate a multi-echo spin echo.
    shim : bool
        Shim the total field over the intracranial volume (:func:`apply_shim`) before
        the echoes are formed; the shim is recorded as ``b0_shim``.
    """
    tes = echo_times
    chi_fine = chi_tab.astype(np.float32)[labels_fine]
    total_fine, chi_brain_fine, brain_mean_table, local_fine = _fine_fields(
        chi_fine, ic_fine, fine_voxel, b0)
    shim_record: dict[str, Any] = {}
    if shim:
        half = tuple(n * v / 2.0 for n, v in zip(matrix3, voxel3, strict=True))
        axes_mm = tuple(np.asarray(a, np.float64) * h for a, h in zip(unit, half, strict=True))
        shim_record = {"b0_shim": apply_shim(total_fine, ic_fine, axes_mm)}

    m0_fine = TISSUES.m0.astype(np.float32)[labels_fine]
    r2s_fine = r2s_tab.astype(np.float32)[labels_fine]
    r2_fine = TISSUES.r2_per_s.astype(np.float32)[labels_fine]
    phi0_fine = _phase_offset(gen, (unit[0][:, None, None], unit[1][None, :, None],
                                    unit[2][None, None, :]))

    signal = _gre_signal(tes, field_strength, m0_fine, r2s_fine, phi0_fine, total_fine,
                         matrix3, ss)

    labels = _block_majority(labels_fine, ss)
    brain_mask, chi, local = _brain_truth(ic_fine, chi_brain_fine, local_fine, ss)

    sigma = _add_noise(signal, labels, snr, gen)
    phase = np.angle(signal).astype(np.float32)
    phase[phase <= -np.pi] = np.float32(np.pi)

    params: dict[str, Any] = {
        "matrix": list(matrix3), "voxel_size_mm": list(voxel3),
        "field_strength_t": field_strength, "snr_echo1_wm": snr,
        "b0_direction_voxel": b0.tolist(), "echo_times_s": tes.tolist(), **parameters,
        "brain_mean_chi_table_ppm": brain_mean_table, "head_scale": head_scale,
        "supersampling": ss, "pad_factor": PAD_FACTOR,
        "noise_sigma": sigma, **shim_record,
    }
    mese_fields: dict[str, Any] = {}
    if mese is not None:
        mese_fields = _simulate_mese(mese, labels_fine, unit, ss, sigma, gen)
        params["mese"] = mese.parameters()
    log.debug("phantom session simulated: %s", params)
    coarse = {name: _block_mean(fine, ss).astype(np.float32) for name, fine in (
        ("chi_full", chi_fine), ("r2star", r2s_fine), ("r2", r2_fine), ("s0", m0_fine),
        ("total_field", total_fine), ("phase_offset", phi0_fine))}
    affine = phantom_affine(matrix3, voxel3, b0)
    # Fine voxel j of an output voxel's ss x ss x ss block sits at output index
    # (j + 0.5) / ss - 0.5.
    to_output = np.diag([1.0 / ss] * 3 + [1.0])
    to_output[:3, 3] = 0.5 / ss - 0.5
    return PhantomSession(
        **mese_fields, **coarse, magnitude=np.abs(signal).astype(np.float32), phase=phase,
        echo_times=tes, field_strength=float(field_strength),
        affine=affine, voxel_size=voxel3, b0_direction=b0,
        chi=chi, brain_mask=brain_mask, labels=labels, local_field=local, noise_sigma=sigma,
        label_names=dict(enumerate(TISSUES.names)), parameters=params,
        fine_labels=(labels_fine, affine @ to_output))


def _simulate_mese(protocol: MeseProtocol, labels_fine: np.ndarray,
                   unit_fine: tuple[np.ndarray, ...], ss: int, sigma: float,
                   gen: np.random.Generator) -> dict[str, Any]:
    """MESE magnitudes: per output voxel Σ_label fraction·M0·EPG(T2_label, B1_voxel)."""
    from alsiron.relax.t2 import simulate_mese

    shape = tuple(n // ss for n in labels_fine.shape)
    # B1 at the output voxel centres (smooth, so partial volume of B1 is negligible).
    centres = tuple(u.reshape(-1, ss).mean(axis=1) for u in unit_fine)
    b1 = protocol.b1_field(np.meshgrid(*centres, indexing="ij"))
    signal = np.zeros((protocol.n_echoes, *shape), np.float32)
    m0 = TISSUES.m0
    t2 = 1.0 / np.maximum(TISSUES.r2_per_s, 1e-6)
    for label in np.unique(labels_fine):
        if m0[label] <= 0:
            continue
        fraction = _block_mean((labels_fine == label).astype(np.float32), ss)
        where = np.nonzero(fraction > 0)
        trains = simulate_mese(np.full(where[0].size, t2[label]), b1[where],
                               n_echoes=protocol.n_echoes, echo_spacing=protocol.echo_spacing,
                               refocusing_angle=protocol.refocusing_angle, t1=protocol.t1)
        signal[(slice(None),) + where] += np.float32(m0[label]) * fraction[where] * trains
    if sigma > 0:
        noise = gen.standard_normal((2, *signal.shape), dtype=np.float32) * np.float32(sigma)
        signal = np.hypot(signal + noise[0], noise[1])
    tes = protocol.echo_spacing * np.arange(1, protocol.n_echoes + 1)
    return {"mese_magnitude": signal.astype(np.float32), "mese_echo_times": tes,
            "mese_protocol": protocol, "b1": b1}


# ------------------------------------------------------------------------------ cohort


@dataclass(frozen=True)
class PhantomSubject:
    """Cohort attributes of one simulated participant (drawn by :func:`draw_cohort`)."""

    participant_id: str
    group: Group
    age: float
    sex: str
    site: str
    precentral_residual_ppm: float
    deep_grey_chi_scale: float
    baseline: _dt.datetime
    session_years: tuple[float, ...]

    def precentral_offset_ppm(self, years: float) -> float:
        """Precentral χ offset at ``years`` after baseline: residual + age + site, ppm."""
        age_term = PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR * (self.age + years - AGE_CENTRE_YEARS)
        return self.precentral_residual_ppm + age_term + SITE_OFFSET_PPM[self.site]

    def acq_time(self, session_index: int) -> str:
        """BIDS acq_time of a session (ISO 8601, seconds)."""
        when = self.baseline + _dt.timedelta(days=365.25 * self.session_years[session_index])
        return when.replace(microsecond=0).isoformat()


def _residual_sd() -> float:
    age_sd = (AGE_RANGE_YEARS[1] - AGE_RANGE_YEARS[0]) / math.sqrt(12.0)
    site_values = np.array(list(SITE_OFFSET_PPM.values()))
    var = (PRECENTRAL_BETWEEN_SUBJECT_SD_PPM**2 - (PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR * age_sd)**2
           - site_values.var())
    return math.sqrt(var)


def draw_cohort(n_subjects: int, n_sessions: int, *, seed: int = 0,
                als_fraction: float = 0.5) -> list[PhantomSubject]:
    """Draw the participants of a phantom cohort (deterministic for a seed).

    Group assignment is interleaved: participant i (0-based) is ALS when
    ``floor((i + 1) f) > floor(i f)`` (f = 0.5: sub-01 control, sub-02 ALS, ...).
    Ages ~ U(40, 75) years, sex M/F with equal odds, site-01/site-02 with equal odds,
    precentral residual ~ N(0, SD) with SD chosen so that residual, age and site terms
    together give :data:`PRECENTRAL_BETWEEN_SUBJECT_SD_PPM`; sessions are
    182 ± U(14) days apart.
    """
    if n_subjects < 1 or n_sessions < 1:
        raise ValueError("need at least one subject and one session")
    if not 0.0 <= als_fraction <= 1.0:
        raise ValueError(f"als_fraction must lie in [0, 1], got {als_fraction!r}")
    rng = np.random.default_rng([seed, 0x5EED])
    sd = _residual_sd()
    cohort = []
    for i in range(n_subjects):
        is_als = math.floor((i + 1) * als_fraction) > math.floor(i * als_fraction)
        age = round(float(rng.uniform(*AGE_RANGE_YEARS)), 1)
        sex = "F" if rng.random() < 0.5 else "M"
        site = "site-01" if rng.random() < 0.5 else "site-02"
        residual = float(rng.normal(0.0, sd))
        scale = float(rng.normal(1.0, DEEP_GREY_SCALE_SD))
        baseline = _dt.datetime(2025, 1, 6, 8, 0) + _dt.timedelta(
            days=int(rng.integers(0, 365)), minutes=15 * int(rng.integers(0, 40)))
        days = np.concatenate([[0.0], SESSION_INTERVAL_DAYS + rng.uniform(
            -SESSION_JITTER_DAYS, SESSION_JITTER_DAYS, n_sessions - 1)])
        years = tuple(float(round(d)) / 365.25 for d in np.cumsum(days))
        cohort.append(PhantomSubject(
            participant_id=f"sub-{i + 1:02d}", group="ALS" if is_als else "control",
            age=age, sex=sex, site=site, precentral_residual_ppm=residual,
            deep_grey_chi_scale=scale, baseline=baseline, session_years=years))
    return cohort


# -------------------------------------------------------------------------- BIDS writer


def _tsv(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def _generated_by() -> list[dict[str, str]]:
    return [{"Name": "alsiron-phantom", "Version": alsiron.__version__,
             "Description": "alsiron numerical head phantom (alsiron.sim.phantom.write_dataset)"}]


def write_session(out_dir: str | Path, session: PhantomSession, subject: str,
                  session_label: str, *, overwrite: bool = False) -> list[Path]:
    """Write one simulated session as BIDS raw MEGRE (and MESE) files plus ground truth.

    Parameters
    ----------
    out_dir : path
        BIDS dataset root.
    session : PhantomSession
    subject, session_label : str
        BIDS labels without prefix ("01").

    Returns
    -------
    list of Path
        Every file written.
    """
    root = Path(out_dir)
    stem = f"sub-{subject}_ses-{session_label}"
    anat = root / f"sub-{subject}" / f"ses-{session_label}" / "anat"
    truth = root / "derivatives" / "phantom" / f"sub-{subject}" / f"ses-{session_label}" / "anat"
    written = []
    freq_mhz = GAMMA_BAR_HZ_PER_T * session.field_strength * 1e-6
    for e, te in enumerate(session.echo_times):
        common = {
            "EchoTime": float(te), "EchoNumber": e + 1,
            "MagneticFieldStrength": session.field_strength,
            "ImagingFrequency": round(freq_mhz, 6), "FlipAngle": FLIP_ANGLE_DEG,
            "RepetitionTime": REPETITION_TIME_S, "Manufacturer": "alsiron-phantom",
            "ManufacturersModelName": "numerical head phantom",
            "MRAcquisitionType": "3D", "PulseSequenceType": "multi-echo gradient echo",
        }
        for part, data, extra in (
            ("mag", session.magnitude[e], {}),
            ("phase", session.phase[e], {"Units": "rad"}),
        ):
            path = anat / f"{stem}_echo-{e + 1}_part-{part}_MEGRE.nii.gz"
            written.append(save_nifti(path, data, session.affine, sidecar={**common, **extra},
                                      overwrite=overwrite))

    if session.mese_magnitude is not None and session.mese_protocol is not None:
        proto = session.mese_protocol
        for e, te in enumerate(session.mese_echo_times):
            sidecar = {
                "EchoTime": float(te), "EchoNumber": e + 1,
                "MagneticFieldStrength": session.field_strength,
                "ImagingFrequency": round(freq_mhz, 6), "FlipAngle": 90.0,
                "RefocusingFlipAngle": proto.refocusing_angle,
                "RepetitionTime": MESE_REPETITION_TIME_S, "Manufacturer": "alsiron-phantom",
                "ManufacturersModelName": "numerical head phantom",
                "MRAcquisitionType": "2D", "PulseSequenceType": "multi-echo spin echo (CPMG)",
            }
            path = anat / f"{stem}_echo-{e + 1}_MESE.nii.gz"
            written.append(save_nifti(path, session.mese_magnitude[e], session.affine,
                                      sidecar=sidecar, overwrite=overwrite))

    params = session.parameters
    truths: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        ("Chimap", session.chi, {
            "Units": "ppm", "Reference": "mean over the brain mask (desc-brain_mask) = 0",
            "Description": "brain-tissue susceptibility, 0 outside the brain mask"}),
        ("desc-fullhead_Chimap", session.chi_full, {
            "Units": "ppm", "Reference": "tissue table (air +9.4 ppm), not demeaned",
            "Description": "susceptibility of every compartment incl. air and bone"}),
        ("R2starmap", session.r2star, {"Units": "1/s"}),
        ("R2map", session.r2, {"Units": "1/s"}),
        ("S0map", session.s0, {"Units": "arbitrary",
                               "Description": "proton density M0 (CSF = 1)"}),
        ("desc-brain_mask", session.brain_mask.astype(np.uint8), {
            "Type": "Brain", "Description": "intracranial volume, >= half of the voxel"}),
        ("dseg", session.labels, {"Description": "majority tissue label; names in dseg.tsv"}),
        ("desc-total_fieldmap", session.total_field, {
            "Units": "ppm", "Description": "field of all sources (air, bone, tissue), "
            "relative to B0, over the whole field of view (arbitrary constant)"
            + ("; after the 2nd-order B0 shim over the intracranial volume "
               "(PhantomParameters.b0_shim): the field the phase was made from"
               if "b0_shim" in params else "")}),
        ("desc-local_fieldmap", session.local_field, {
            "Units": "ppm", "Description": "field of the Chimap sources alone, "
            "0 outside the brain mask"}),
        ("desc-phaseoffset_phasemap", session.phase_offset, {
            "Units": "rad", "Description": "echo-independent phase offset phi0, unwrapped"}),
    ]
    if session.b1 is not None:
        truths.append(("TB1map", session.b1, {
            "Units": "ratio", "Description": "refocusing flip angle of the MESE as a "
            "fraction of the nominal RefocusingFlipAngle (1 = nominal)"}))
    truths.extend(session.extra_truth)
    for suffix, data, side in truths:
        sidecar = {**side, "GeneratedBy": _generated_by(), "PhantomParameters": params}
        path = truth / f"{stem}_{suffix}.nii.gz"
        written.append(save_nifti(path, data, session.affine, sidecar=sidecar,
                                  overwrite=overwrite))
    rows = [[i, name] for i, name in session.label_names.items()]
    written.append(save_text(truth / f"{stem}_dseg.tsv", _tsv(["index", "name"], rows),
                             overwrite=overwrite))
    if session.fine_labels is not None:
        fine, fine_affine = session.fine_labels
        written.append(save_nifti(truth / f"{stem}_res-fine_dseg.nii.gz", fine, fine_affine,
                                  sidecar={"Description": "tissue label on the simulation's "
                                           "fine grid (names in res-fine_dseg.tsv): the "
                                           "labels every output voxel was averaged from",
                                           "GeneratedBy": _generated_by(),
                                           "PhantomParameters": params},
                                  overwrite=overwrite))
        written.append(save_text(truth / f"{stem}_res-fine_dseg.tsv",
                                 _tsv(["index", "name"], rows), overwrite=overwrite))
    return written


def write_dataset(
    out_dir: str | Path,
    *,
    subjects: int = 2,
    sessions: int = 1,
    matrix: int | tuple[int, int, int] | None = None,
    voxel_size: float | tuple[float, float, float] = DEFAULT_VOXEL_SIZE_MM,
    field_strength: float = 3.0,
    snr: float | None = DEFAULT_SNR,
    b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0),
    seed: int = 0,
    echo_times: tuple[float, ...] = DEFAULT_ECHO_TIMES_S,
    als_fraction: float = 0.5,
    als_effect_ppm: float = DEFAULT_ALS_EFFECT_PPM,
    als_progression_ppm_per_year: float = DEFAULT_ALS_PROGRESSION_PPM_PER_YEAR,
    mese: MeseProtocol | None = None,
    overwrite: bool = False,
    anatomy: Literal["geometric", "template"] = "geometric",
    shim: bool = True,
) -> Path:
    """Simulate a phantom cohort and write it as a BIDS dataset with ground truth.

    Parameters
    ----------
    out_dir : path
        Dataset root (created).  Raw data under ``sub-XX/ses-YY/anat``, truth under
        ``derivatives/phantom``.
    subjects, sessions : int
        Number of participants and of sessions (about 6 months apart) per participant.
    matrix, voxel_size, field_strength, snr, b0_direction, echo_times
        As :func:`simulate_subject` (voxel size mm, B0 T, TE s); matrix None: the
        phantom's default (:data:`DEFAULT_MATRIX`, or the anatomical field of view).
    seed : int
        Same seed, same files (byte for byte).
    als_fraction : float
        Fraction of ALS participants, interleaved with controls.
    als_effect_ppm, als_progression_ppm_per_year : float
        ALS whole-precentral χ excess at baseline (ppm) and its yearly growth (ppm/year).
    mese : MeseProtocol, optional
        Also write a multi-echo spin echo per session (``echo-<K>_MESE`` files, sidecars
        with EchoTime [s], FlipAngle 90 and RefocusingFlipAngle [deg]) and the B1 truth
        (``TB1map`` under derivatives/phantom).
    overwrite : bool
        Replace existing files instead of refusing.
    anatomy : {"geometric", "template"}
        The ellipsoid head of this module, or the folded-cortex head of
        :mod:`alsiron.sim.anatomical` (one deformed MNI152 anatomy per participant).
    shim : bool
        Anatomical head only: shim B0 over the brain (2nd order) before the echoes are
        formed (the geometric head is not shimmed).

    Returns
    -------
    Path
        The dataset root.
    """
    if anatomy not in ("geometric", "template"):
        raise InvalidInputError(f"anatomy must be 'geometric' or 'template', got {anatomy!r}")
    root = Path(out_dir)
    cohort = draw_cohort(subjects, sessions, seed=seed, als_fraction=als_fraction)
    save_json(root / "dataset_description.json", {
        "Name": "alsiron numerical head phantom", "BIDSVersion": "1.10.0",
        "DatasetType": "raw", "GeneratedBy": _generated_by(),
    }, overwrite=overwrite)
    save_text(root / "README", "Simulated multi-echo GRE head phantom written by alsiron "
              "(see phantoms/README.md in the alsiron sources). Ground truth in "
              "derivatives/phantom.\n", overwrite=overwrite)
    save_text(root / "participants.tsv", _tsv(
        ["participant_id", "age", "sex", "group", "site"],
        [[s.participant_id, s.age, s.sex, s.group, s.site] for s in cohort]),
        overwrite=overwrite)
    save_json(root / "participants.json", {
        "age": {"Description": "age at the first session", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
        "group": {"Description": "diagnostic group",
                  "Levels": {"control": "healthy control", "ALS": "amyotrophic lateral "
                             "sclerosis (simulated precentral deep-layer iron excess)"}},
        "site": {"Description": "acquisition site (site-02 has +1 ppb precentral chi)"},
    }, overwrite=overwrite)
    deriv = root / "derivatives" / "phantom"
    save_json(deriv / "dataset_description.json", {
        "Name": "alsiron phantom ground truth", "BIDSVersion": "1.10.0",
        "DatasetType": "derivative", "GeneratedBy": _generated_by(),
    }, overwrite=overwrite)

    for i, subj in enumerate(cohort):
        label = subj.participant_id.removeprefix("sub-")
        rows = []
        for k in range(sessions):
            ses = f"{k + 1:02d}"
            years = subj.session_years[k]
            log.info("phantom: simulating %s ses-%s", subj.participant_id, ses)
            simulate: Any = simulate_subject
            extra: dict[str, Any] = {}
            if anatomy == "template":
                from alsiron.sim.anatomical import simulate_anatomical_subject as simulate
                extra = {"anatomy_seed": (seed, i), "shim": shim}
            elif matrix is None:
                extra = {"matrix": DEFAULT_MATRIX}
            if matrix is not None:
                extra["matrix"] = matrix
            session = simulate(
                **extra, voxel_size=voxel_size, field_strength=field_strength,
                snr=snr, b0_direction=b0_direction, echo_times=echo_times, group=subj.group,
                als_effect_ppm=als_effect_ppm,
                als_progression_ppm_per_year=als_progression_ppm_per_year,
                years_since_baseline=years,
                precentral_offset_ppm=subj.precentral_offset_ppm(years),
                deep_grey_chi_scale=subj.deep_grey_chi_scale, mese=mese,
                rng=np.random.default_rng([seed, i, k]),
            )
            session.parameters.update({"participant_id": subj.participant_id,
                                       "session_id": f"ses-{ses}", "site": subj.site,
                                       "age_at_session": round(subj.age + years, 2)})
            write_session(root, session, label, ses, overwrite=overwrite)
            rows.append([f"ses-{ses}", subj.acq_time(k), round(years, 4)])
        save_text(root / subj.participant_id / f"{subj.participant_id}_sessions.tsv",
                  _tsv(["session_id", "acq_time", "years_since_baseline"], rows),
                  overwrite=overwrite)
    save_json(root / "sessions.json", {
        "acq_time": {"Description": "date and time of the session (simulated)"},
        "years_since_baseline": {"Description": "time since the participant's first "
                                 "session", "Units": "year"},
    }, overwrite=overwrite)
    return root

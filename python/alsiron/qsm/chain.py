"""The per-session QSM + R2* chain: MEGRE series in, maps and provenance out.

Order follows the 2024 ISMRM QSM consensus: brain mask from the first-echo magnitude,
echoes combined by a magnitude-weighted fit of the unwrapped phase over echo time
(before background removal), phase-quality masking with the fit residual, background
field removal (PDF by default; V-SHARP, iSMV or LBV), regularised dipole inversion,
whole-brain-mean referencing (or a given reference region). The settings of every step
are :class:`alsiron.qsm.settings.QsmParameters`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from alsiron import __version__, qsm, relax
from alsiron.errors import InvalidInputError
from alsiron.field import brain_mask as bm
from alsiron.field import echo_fit as fieldmap
from alsiron.io.derivatives import DerivativeMap
from alsiron.qsm import anchor
from alsiron.qsm import inversion as inv
from alsiron.qsm.settings import (
    BFR_ERODE_MM,
    BFR_METHODS,
    PDF_SOURCE_REGIONS,
    BackgroundSettings,
    FieldSettings,
    MaskSettings,
    QsmParameters,
)
from alsiron.volume import MegreSeries, Volume

log = logging.getLogger("alsiron")

#: Called as ``progress(step_index, n_steps, message)`` before each step.
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class InputSources:
    """Where the inputs given in place of a chain step came from, as the sidecar records
    them (the ``Source`` of the BrainMask, FieldMap and Referencing steps).

    Attributes
    ----------
    brain_mask, field_map, reference : str
        The user brain mask's, total field map's and reference region's file (the
        reference as "FILE label N" when a label was chosen); "array" when the input
        was given as an array only.
    """

    brain_mask: str = "array"
    field_map: str = "array"
    reference: str = "array"


@dataclass
class SessionResult:
    """Maps of one MEGRE series and the record of how they were made."""

    chi: Volume
    r2star: Volume
    t2star: Volume
    s0: Volume
    r2star_status: Volume
    total_field: Volume
    local_field: Volume
    brain_mask: Volume
    qsm_mask: Volume
    provenance: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    field_sd: Volume | None = None

    def derivative_maps(self) -> list[DerivativeMap]:
        """The maps with their BIDS suffixes, ready for
        :func:`~alsiron.io.derivatives.write_maps`."""
        return [DerivativeMap(suffix, getattr(self, attr), text, desc=desc)
                for attr, suffix, desc, text in _OUTPUTS if getattr(self, attr) is not None]


#: (SessionResult attribute, BIDS suffix, desc entity, description) of every output map.
_OUTPUTS: list[tuple[str, str, str | None, str]] = [
    ("chi", "Chimap", None,
     "Magnetic susceptibility referenced to the whole-brain mean; paramagnetic positive"),
    ("r2star", "R2starmap", None, "Apparent transverse relaxation rate R2*"),
    ("t2star", "T2starmap", None, "T2* = 1/R2*"),
    ("s0", "S0map", None, "Signal extrapolated to TE = 0 by the R2* fit"),
    ("r2star_status", "status", "r2starfit", "R2* fit status code per voxel (see StatusCodes)"),
    ("total_field", "fieldmap", "total",
     "Total field from the multi-echo phase fit, in ppm of B0"),
    ("field_sd", "fieldmap", "totalsd",
     "Standard deviation of the total field from the noise (Cramér-Rao bound of the "
     "magnitude-weighted complex fit with the noise estimated from its residuals), in ppm; "
     "absent when the field map was given as input"),
    ("local_field", "fieldmap", "local",
     "Local (tissue) field after background-field removal, in ppm of B0"),
    ("brain_mask", "mask", "brain", "Brain mask from the magnitude"),
    ("qsm_mask", "mask", "qsm",
     "Mask of valid susceptibility voxels (brain mask, phase quality and the erosions "
     "before and by background-field removal)"),
]

#: (suffix, desc) of every output, for checking that none exists before a run.
OUTPUT_NAMES: list[tuple[str, str | None]] = [(s, d) for _, s, d, _ in _OUTPUTS]




def _steps(inversion: str, bfr: str) -> list[str]:
    kind = "single-step" if inversion in inv.SINGLE_STEP_METHODS else "dipole"
    return ["brain mask", "unwrapping + multi-echo field fit",
            f"{BFR_METHODS[bfr]} background removal",
            f"{kind} inversion ({inversion})", "R2* fit"]


#: Erosion [mm] before the background removal whose local field anchors a single-step
#: inversion (at least one voxel edge): only the outer voxel layer, whose field carries
#: partial-volume errors, goes. The anchor must reach the deep cortex: with LBV's own
#: 6 mm the ALS deep-layer excess on the anatomical phantom came out at 0.68 of the truth,
#: with 2 mm at 0.85 (docs/qsm_anatomy.md).
SINGLE_STEP_ANCHOR_ERODE_MM = 2.0


def effective_background(p: QsmParameters, voxel_size: tuple[float, float, float]
                         ) -> BackgroundSettings:
    """The background settings that run: ``p.background`` with its unset PDF settings
    resolved for the inversion that follows (:meth:`BackgroundSettings.resolved`), and
    before a single-step inversion an unset erosion depth as
    :data:`SINGLE_STEP_ANCHOR_ERODE_MM` (or the largest voxel edge when deeper)."""
    single_step = p.inversion.method in inv.SINGLE_STEP_METHODS
    s = p.background.resolved(single_step)
    if single_step and s.erode_mm is None and s.erode_voxels is None:
        return dataclasses.replace(
            s, erode_mm=_at_least_one_voxel(SINGLE_STEP_ANCHOR_ERODE_MM, voxel_size))
    return s


def process_series(series: MegreSeries, params: QsmParameters | None = None, *,
                   brain_mask: np.ndarray | None = None,
                   reference_mask: np.ndarray | None = None,
                   phase_unwrapped: bool = False,
                   total_field_ppm: np.ndarray | None = None,
                   input_sources: InputSources | None = None,
                   progress: ProgressCallback | None = None,
                   iteration_progress: Callable[[int, int], None] | None = None
                   ) -> SessionResult:
    """Run the QSM and R2* chain on one MEGRE series.

    Parameters
    ----------
    series : MegreSeries
        Loaded magnitude/phase, echo times [s], B0 [T] and geometry.
    params : QsmParameters, optional
        Algorithm parameters (defaults when omitted).
    brain_mask : ndarray of bool, shape (X, Y, Z), optional
        A brain mask given by the user, used instead of the one derived from the
        magnitude (phase-quality masking and erosion still apply).
    reference_mask : ndarray of bool, shape (X, Y, Z), optional
        Reference region (e.g. CSF): χ is shifted so that its mean there is 0, and the
        region's mean ± SD relative to the whole brain is recorded (consensus advice).
        Default: the whole-brain mean is 0.
    phase_unwrapped : bool
        ``series.phase`` is already unwrapped (spatially and over echoes): it is only
        fitted (no unwrapping).
    total_field_ppm : ndarray, shape (X, Y, Z), optional
        A total field map [ppm] given by the user: no unwrapping or fit; the phase is
        not used (phase-quality masking is skipped, no field SD map).
    input_sources : InputSources, optional
        Where ``brain_mask``, ``reference_mask`` and ``total_field_ppm`` came from, for
        the provenance (default: "array").
    progress : callable, optional
        ``progress(i, n, message)`` called before each step.
    iteration_progress : callable, optional
        ``iteration_progress(iteration, max_iter)`` called during iterative solvers.

    Returns
    -------
    SessionResult
        χ [ppm, whole-brain mean = 0], R2* [1/s], T2* [s], S0, fit status, total and
        local field [ppm], brain and QSM masks, with provenance and step timings.
    """
    p = params or QsmParameters()
    sources = input_sources or InputSources()
    steps = _steps(p.inversion.method, p.background.method)
    timings: dict[str, float] = {}

    def step(i: int) -> float:
        if progress is not None:
            progress(i, len(steps), steps[i])
        return time.perf_counter()

    vsz = series.voxel_size

    t0 = step(0)
    brain = _brain_mask_step(series, p.mask, brain_mask)
    timings["brain_mask"] = time.perf_counter() - t0

    t0 = step(1)
    background = effective_background(p, vsz)
    fit = _field_step(series, p.field, brain, phase_unwrapped, total_field_ppm,
                      sources.field_map)
    quality = bfr_input_mask(fit.quality, vsz, background, field_sd=fit.field_sd)
    timings["field_fit"] = time.perf_counter() - t0

    t0 = step(2)
    radii = vsharp_radii(background, vsz)
    total = np.nan_to_num(fit.total)
    local, local_mask, bfr_record = remove_background(total, quality, series, background,
                                                      radii, brain=fit.quality)
    local_mask = local_mask.astype(bool)
    if not local_mask.any():
        raise InvalidInputError(f"mask is empty after {BFR_METHODS[background.method]} erosion: "
                                "the brain is smaller than its sphere radius")
    timings["background_removal"] = time.perf_counter() - t0

    t0 = step(3)
    if p.inversion.method in inv.SINGLE_STEP_METHODS:
        qsm_mask = fit.quality.astype(bool)
        if p.inversion.sstv_refine_iter > 0:
            local, local_mask, bfr_record["AnchorRefinement"] = anchor.refine_anchor(
                p.inversion.method, total, qsm_mask, local, local_mask,
                quality, voxel_size=vsz, b0_dir=series.b0_direction, settings=p.inversion,
                lbv_tol=background.lbv_tol, lbv_max_iter=background.lbv_max_iter,
                progress=iteration_progress)
        chi, inv_params = inv.invert_single_step(
            p.inversion.method, total, qsm_mask, local, local_mask,
            voxel_size=vsz, b0_dir=series.b0_direction, settings=p.inversion,
            progress=iteration_progress, field_sd=fit.field_sd)
    else:
        qsm_mask = local_mask
        rss, phase_scale = inversion_inputs(series)
        chi, inv_params = invert(local, qsm_mask, vsz, series.b0_direction, p.inversion,
                                 magnitude=rss, phase_scale=phase_scale,
                                 progress=iteration_progress, field_sd=fit.field_sd)
    chi, referencing = _reference_step(chi, qsm_mask, reference_mask, sources.reference)
    timings["inversion"] = time.perf_counter() - t0

    t0 = step(4)
    r2 = relax.fit_r2star_loglinear(series.magnitude, series.echo_times, mask=brain,
                                    weighted=p.r2star.weighted)
    timings["r2star"] = time.perf_counter() - t0

    provenance = pipeline_provenance(series, p, radii, background)
    steps_record = provenance["Steps"]
    steps_record["BackgroundFieldRemoval"].update(bfr_record)
    steps_record["DipoleInversion"].update(inv_params)
    steps_record["Referencing"] = referencing
    steps_record["FieldMap"] = fit.record
    _field_provenance(steps_record, fit.record, given=total_field_ppm is not None)
    if brain_mask is not None:
        steps_record["BrainMask"] = {"Method": "given by the user",
                                     "Source": sources.brain_mask}
    provenance["QsmMaskVoxels"] = int(qsm_mask.sum())
    provenance["LocalFieldMaskVoxels"] = int(local_mask.sum())
    provenance["BrainMaskVoxels"] = int(brain.sum())
    vox_ml = math.prod(vsz) / 1000.0
    provenance["BrainMaskVolume_mL"] = round(float(brain.sum()) * vox_ml, 1)
    return _session_result(series, chi, r2, fit, np.where(local_mask, local, np.nan), brain,
                           qsm_mask, provenance, timings)


def _brain_mask_step(series: MegreSeries, s: MaskSettings,
                     brain_mask: np.ndarray | None) -> np.ndarray:
    """The brain mask: the user's (checked against the grid) or one from the echo-1
    magnitude."""
    if brain_mask is None:
        brain = bm.brain_mask(series.magnitude[0], method=s.method,
                              voxel_size=series.voxel_size, bet_f=s.bet_f,
                              erode_voxels=s.opening_voxels)
    else:
        brain = np.asarray(brain_mask, dtype=bool)
        if brain.shape != series.shape:
            raise InvalidInputError(f"brain mask has shape {brain.shape} but the data "
                                    f"{series.shape}")
    if not brain.any():
        raise InvalidInputError("brain mask is empty: the magnitude has no distinct head signal")
    return brain


class _FieldFit(NamedTuple):
    """The field step's output: total field [ppm], its SD [ppm] (None for a given map),
    the phase-quality brain mask and the FieldMap provenance record."""

    total: np.ndarray
    field_sd: np.ndarray | None
    quality: np.ndarray
    record: dict[str, Any]


def _field_step(series: MegreSeries, s: FieldSettings, brain: np.ndarray,
                phase_unwrapped: bool, total_field_ppm: np.ndarray | None,
                source: str) -> _FieldFit:
    """Total field from unwrapping and the multi-echo fit, or the user's field map
    (``source`` names it), and the phase-quality brain mask."""
    if total_field_ppm is not None:
        total = np.asarray(total_field_ppm, dtype=np.float32)
        if total.shape != series.shape:
            raise InvalidInputError(f"field map has shape {total.shape} but the data "
                                    f"{series.shape}")
        total = np.where(brain, total, np.nan).astype(np.float32)
        return _FieldFit(total, None, brain & np.isfinite(total),
                         {"Method": "total field map given as input", "Source": source})
    fm = fieldmap.estimate_field(series.magnitude, series.phase, series.echo_times,
                                 brain, field_strength=series.field_strength,
                                 unwrapping=s.unwrapping, phase_unwrapped=phase_unwrapped,
                                 complex_fit=s.complex_fit, phase_offset=s.phase_offset,
                                 voxel_size=series.voxel_size)
    quality = brain & np.isfinite(fm.residual) & (fm.residual <= s.residual_threshold)
    return _FieldFit(fm.field_ppm, fm.field_sd_ppm, quality, dict(fm.method))


def _field_provenance(steps: dict[str, Any], field_record: dict[str, Any], *,
                      given: bool) -> None:
    """The PhaseUnwrapping and EchoCombination steps from the field fit's record, or
    none of the phase steps when the field map was given."""
    if given:
        for key in ("PhaseUnwrapping", "EchoCombination", "PhaseQualityMask"):
            steps.pop(key, None)
        return
    steps["PhaseUnwrapping"] = {
        "Method": field_record.get("PhaseUnwrapping"),
        "PhaseOffsetRemoval": field_record.get("PhaseOffsetRemoval", "none")}
    steps["EchoCombination"] = {
        "Method": field_record.get("EchoCombination"),
        "NoiseSigma": field_record.get("NoiseSigma")}


def _reference_step(chi: np.ndarray, qsm_mask: np.ndarray,
                    reference_mask: np.ndarray | None, source: str
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """χ [ppm] referenced to the whole-brain mean, then to the reference region's mean
    when one is given (``source`` names it), and the Referencing record."""
    chi = qsm.reference_to_mean(chi, qsm_mask)
    if reference_mask is None:
        return chi, {"Method": "whole-brain mean over the QSM mask set to 0"}
    region = np.asarray(reference_mask, dtype=bool) & qsm_mask
    if region.sum() < 10:
        raise InvalidInputError(f"reference region has {int(region.sum())} voxels inside the QSM "
                                "mask; need at least 10")
    offset = float(chi[region].mean())
    referencing = {"Method": "mean over the given reference region set to 0",
                   "Source": source,
                   "RegionVoxels": int(region.sum()),
                   "RegionMeanVsWholeBrain_ppm": offset,
                   "RegionSDVsWholeBrain_ppm": float(chi[region].std())}
    return np.where(qsm_mask, chi - np.float32(offset), np.float32(0.0)), referencing


def _session_result(series: MegreSeries, chi: np.ndarray, r2: Any, fit: _FieldFit,
                    local: np.ndarray, brain: np.ndarray, qsm_mask: np.ndarray,
                    provenance: dict[str, Any], timings: dict[str, float]) -> SessionResult:
    """The maps as volumes on the series' grid, NaN outside their masks."""
    aff = series.affine

    def vol(data: np.ndarray, units: str) -> Volume:
        return Volume(data=data, affine=aff, units=units)

    return SessionResult(
        chi=vol(np.where(qsm_mask, chi, np.nan).astype(np.float32), "ppm"),
        r2star=vol(r2.r2star, "1/s"),
        t2star=vol(r2.t2star, "s"),
        s0=vol(r2.s0, "arbitrary"),
        r2star_status=Volume(data=r2.status, affine=aff, units="",
                             provenance={"StatusCodes": {str(k): v for k, v in
                                                         relax.R2STAR_STATUS.items()}}),
        total_field=vol(np.where(brain, fit.total, np.nan).astype(np.float32), "ppm"),
        local_field=vol(np.asarray(local, dtype=np.float32), "ppm"),
        brain_mask=vol(brain.astype(np.uint8), ""),
        qsm_mask=vol(qsm_mask.astype(np.uint8), ""),
        provenance=provenance,
        timings_s=timings,
        field_sd=(None if fit.field_sd is None
                  else vol(np.where(brain, fit.field_sd, np.nan).astype(np.float32), "ppm")),
    )


def bfr_input_mask(quality: np.ndarray, voxel_size: tuple[float, float, float],
                   s: BackgroundSettings, *, field_sd: np.ndarray | None = None
                   ) -> np.ndarray:
    """The mask handed to background-field removal.

    The phase-quality brain mask ``quality`` eroded by ``s.erode_mm`` (Euclidean, in
    mm; :func:`alsiron.qsm.bfr.erode_mm`) or, when set, by the legacy ``s.erode_voxels``
    6-connected voxel erosions; then, with ``s.trim_sd_factor`` and a ``field_sd``
    map [ppm], the reliability trim: voxels within ``s.trim_band_mm`` of the edge
    whose field SD exceeds ``trim_sd_factor`` × the median field SD of ``quality``
    are dropped as well.
    """
    if s.erode_voxels is not None:
        mask = (ndimage.binary_erosion(quality, iterations=s.erode_voxels)
                if s.erode_voxels > 0 else quality.copy())
    else:
        mask = qsm.erode_mm(quality, voxel_size, erosion_depth_mm(s, voxel_size))
    if s.trim_sd_factor is not None and field_sd is not None and mask.any():
        sd = np.asarray(field_sd, dtype=np.float64)
        finite = quality & np.isfinite(sd)
        if finite.any():
            reference = float(np.median(sd[finite]))
            sd = np.nan_to_num(sd, nan=np.inf)  # no SD (fit failed): unreliable
            band = mask & (qsm.edge_distance_mm(mask, voxel_size) <= s.trim_band_mm)
            mask = mask & ~(band & (sd > s.trim_sd_factor * reference))
    return mask


def erosion_depth_mm(s: BackgroundSettings, voxel_size: tuple[float, float, float]
                     ) -> float:
    """The pre-BFR erosion depth [mm]: ``s.erode_mm`` when given, else the method's
    default (:data:`BFR_ERODE_MM`) but at least the largest voxel edge, so that the outer
    voxel layer — partial volume with bone or air at any voxel size — always goes (no
    erosion was the worst setting at every resolution, docs/qsm_mask_erosion.md)."""
    if s.erode_mm is None:
        return _at_least_one_voxel(BFR_ERODE_MM[s.method], voxel_size)
    return float(s.erode_mm)


def _at_least_one_voxel(depth_mm: float, voxel_size: tuple[float, float, float]) -> float:
    """A default erosion depth [mm], raised to the largest voxel edge when shallower."""
    return max(depth_mm, max(float(v) for v in voxel_size))


def erosion_record(s: BackgroundSettings, voxel_size: tuple[float, float, float]
                   ) -> dict[str, Any]:
    """Sidecar items of the pre-BFR erosion: ``MaskErosionMm`` always (for the legacy
    voxel erosion: voxels × the largest voxel edge, the depth it reaches along that
    axis), ``MaskErosionVoxels`` only in legacy mode, and how it was done."""
    record: dict[str, Any]
    if s.erode_voxels is not None:
        record = {"MaskErosionMm": float(s.erode_voxels) * max(voxel_size),
                  "MaskErosionVoxels": int(s.erode_voxels),
                  "MaskErosionMethod": "legacy: repeated 6-connected one-voxel erosions"}
    else:
        record = {"MaskErosionMm": erosion_depth_mm(s, voxel_size),
                  "MaskErosionMethod": "voxels whose centre lies within MaskErosionMm of a "
                                       "voxel outside the phase-quality brain mask removed "
                                       "(Euclidean distance in mm)"}
    if s.trim_sd_factor is not None:
        record["ReliabilityTrim"] = {"FieldSDFactor": s.trim_sd_factor,
                                     "BandMm": s.trim_band_mm,
                                     "Rule": "edge-band voxels with field SD above "
                                             "FieldSDFactor x the median field SD removed"}
    return record


def inversion_inputs(series: MegreSeries) -> tuple[np.ndarray, float]:
    """What the dipole inversion takes from the MEGRE series beside the local field.

    Returns
    -------
    magnitude : ndarray, float64
        Root-sum-of-squares magnitude over echoes (the data weights and MEDI's edges).
    phase_scale : float
        Phase per ppm [rad/ppm] at the mean echo time, for the nonlinear data terms
        (MEDI, NDI).
    """
    rss = np.sqrt(np.sum(np.square(series.magnitude, dtype=np.float64), axis=0))
    return rss, inv.phase_per_ppm(series.field_strength, float(np.mean(series.echo_times)))


def invert(local: np.ndarray, mask: np.ndarray, voxel_size: tuple[float, float, float],
           b0_dir: tuple[float, float, float], s: inv.InversionSettings, *,
           magnitude: np.ndarray | None = None, phase_scale: float | None = None,
           progress: Callable[[int, int], None] | None = None,
           field_sd: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The dipole inversion ``s.method`` with the settings ``s`` (χ [ppm], not yet
    referenced) and its run-time provenance; ``magnitude``, ``phase_scale`` [rad/ppm]
    and ``field_sd`` [ppm] as in :func:`alsiron.qsm.inversion.invert`."""
    return inv.invert(s.method, local, mask, voxel_size=voxel_size, b0_dir=b0_dir,
                      magnitude=magnitude, phase_scale=phase_scale, settings=s,
                      progress=progress, field_sd=field_sd)


def remove_background(field: np.ndarray, mask: np.ndarray, series: MegreSeries,
                      s: BackgroundSettings, radii: list[float], *,
                      brain: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Run the background-field removal ``s.method`` on ``mask`` (the eroded brain);
    ``brain`` is the phase-quality brain mask, which PDF's sources stay out of when
    ``s.pdf_sources`` is "outside_brain" (default: ``mask``).

    Returns the local field [ppm], the mask where it is valid and the run-time part of
    the provenance record (iterations run).
    """
    vsz = series.voxel_size
    s = s.resolved(single_step=False)  # no-op on effective_background's settings
    if s.method == "pdf":
        sources = None
        if s.pdf_sources == "outside_brain":
            sources = ~np.asarray(mask if brain is None else brain, dtype=bool)
        local, n_iter = qsm.pdf(field, mask, voxel_size=vsz, b0_dir=series.b0_direction,
                                pad_voxels=s.pdf_pad_voxels, tol=s.pdf_tol,
                                max_iter=s.pdf_max_iter,
                                source_smoothing=s.pdf_source_smoothing, source_mask=sources)
        return local, mask, {"IterationsRun": n_iter}
    if s.method == "ismv":
        local, eroded, n_iter = qsm.ismv(field, mask, voxel_size=vsz,
                                         radius_mm=s.ismv_radius_mm, tol=s.ismv_tol,
                                         max_iter=s.ismv_max_iter)
        return local, eroded, {"IterationsRun": n_iter}
    if s.method == "lbv":
        local, interior, n_iter = qsm.lbv(field, mask, voxel_size=vsz, tol=s.lbv_tol,
                                          max_iter=s.lbv_max_iter)
        return local, interior, {"IterationsRun": n_iter}
    local, eroded = qsm.vsharp(field, mask, voxel_size=vsz, radii_mm=radii,
                               threshold=s.vsharp_threshold)
    return local, eroded, {}


def _brain_mask_provenance(s: MaskSettings) -> dict[str, Any]:
    record: dict[str, Any] = {"Method": bm.BRAIN_MASK_METHODS.get(s.method, s.method)}
    if s.method == "bet":
        record.update({"FractionalIntensity": s.bet_f, "MaxIterations": bm.BET_ITERATIONS,
                       "SettleTolerance_mm_per_100_iterations": bm.BET_SETTLE_MM,
                       "SurfaceVertices": 10 * 4**bm.BET_SUBDIVISIONS + 2,
                       "Reference": "Smith SM, Hum Brain Mapp 17:143 (2002)"})
    else:
        record["OpeningVoxels"] = s.opening_voxels
    return record


def _bfr_provenance(s: BackgroundSettings, series: MegreSeries, radii: list[float]
                    ) -> dict[str, Any]:
    s = s.resolved(single_step=False)  # no-op on effective_background's settings
    record: dict[str, Any] = {"Method": BFR_METHODS[s.method]}
    record.update(erosion_record(s, series.voxel_size))
    if s.method == "pdf":
        record.update({"Reference": "Liu et al. NMR Biomed 2011;24:1129",
                       "Solver": "conjugate gradients on the normal equations, "
                                 "uniform weights, k-space dipole kernel",
                       "Tolerance": s.pdf_tol, "MaxIterations": s.pdf_max_iter,
                       "PaddingVoxels": s.pdf_pad_voxels,
                       "SourceSmoothing_mm2": s.pdf_source_smoothing,
                       "SourceRegion": PDF_SOURCE_REGIONS[s.pdf_sources]})
    elif s.method == "ismv":
        radius = (2.0 * max(series.voxel_size) if s.ismv_radius_mm is None
                  else s.ismv_radius_mm)
        record.update({"Reference": "Wen et al. MRM 2014;72:1065", "Radius_mm": radius,
                       "Tolerance": s.ismv_tol, "MaxIterations": s.ismv_max_iter})
    elif s.method == "lbv":
        record.update({"Reference": "Zhou et al. NMR Biomed 2014;27:312",
                       "Solver": "conjugate gradients, 7-point Laplacian",
                       "Tolerance": s.lbv_tol, "MaxIterations": s.lbv_max_iter})
    else:
        record.update({"Reference": "Li et al. NeuroImage 2011;55:1645; Wu et al. MRM "
                                    "2012;67:137", "Radii_mm": radii,
                       "Threshold": s.vsharp_threshold})
    return record


def default_vsharp_radii(voxel_size: tuple[float, float, float]) -> list[float]:
    """V-SHARP radii [mm]: 24, 20, 16, 12, 9, 6, 3 mm (those above the largest voxel
    edge) and one voxel edge as the smallest."""
    vmax = max(voxel_size)
    return sorted({r for r in (24.0, 20.0, 16.0, 12.0, 9.0, 6.0, 3.0) if r > vmax} | {vmax},
                  reverse=True)


def vsharp_radii(s: BackgroundSettings, voxel_size: tuple[float, float, float]
                 ) -> list[float]:
    """The V-SHARP radii [mm] the chain uses: ``s.vsharp_radii_mm`` when given, else
    :func:`default_vsharp_radii`."""
    return (default_vsharp_radii(voxel_size) if s.vsharp_radii_mm is None
            else list(s.vsharp_radii_mm))


def pipeline_provenance(series: MegreSeries, p: QsmParameters, radii: list[float],
                        background: BackgroundSettings | None = None) -> dict[str, Any]:
    """Acquisition and processing record (the 2024 QSM consensus reporting items);
    ``background`` is the background step that ran (default ``p.background``)."""
    te_ms = [round(t * 1e3, 4) for t in series.echo_times]
    meta = series.metadata
    return {
        "Software": {"Name": "alsiron", "Version": __version__},
        "Acquisition": {
            "MagneticFieldStrength": series.field_strength,
            "ImagingFrequency": meta.get("ImagingFrequency"),
            "Manufacturer": meta.get("Manufacturer"),
            "NumberOfEchoes": series.n_echoes,
            "EchoTime": [float(t) for t in series.echo_times],
            "EchoTimes_ms_TE1_dTE_TEmax": [te_ms[0], round(te_ms[1] - te_ms[0], 4), te_ms[-1]],
            "RepetitionTime": meta.get("RepetitionTime"),
            "FlipAngle": meta.get("FlipAngle"),
            "VoxelSize_mm": list(series.voxel_size),
            "Matrix": list(series.shape),
            "B0Direction_voxel": list(series.b0_direction),
            "PhaseConversion": meta.get("PhaseConversion"),
            "PhaseNegated": bool(meta.get("PhaseNegated", False)),
            "NonFiniteVoxelsZeroed": meta.get("NonFiniteVoxels", 0),
        },
        "Steps": {
            "BrainMask": _brain_mask_provenance(p.mask),
            "PhaseUnwrapping": {"Method": "quality-guided region growing (echo-difference "
                                "phase) + temporal unwrapping"},
            "EchoCombination": {"Method": "magnitude-weighted linear fit of unwrapped phase "
                                "over echo time (before background removal)"},
            "PhaseQualityMask": {"Method": "magnitude-weighted RMS phase residual of the "
                                 "field fit [rad]",
                                 "Threshold": p.field.residual_threshold},
            "BackgroundFieldRemoval": _bfr_provenance(background or p.background, series,
                                                      radii),
            "DipoleInversion": {"Method": inv.INVERSION_METHODS[p.inversion.method]},
            "R2star": {"Method": "weighted log-linear" if p.r2star.weighted
                       else "log-linear"},
        },
        "Parameters": p.to_flat(),
        "Sources": list(series.sources),
    }

"""QSM-CI-style per-stage evaluation on the project's head phantom.

Each stage is scored from the phantom's *true* input to that stage, so one stage's error
does not hide another's (QSM-CI's layout). The dipole stage here: χ from the true local
field (the field of the brain's own susceptibility, simulated on a 2× finer grid and
averaged down, so the inversion's discrete kernel did not make it). Scores are those of
DESIGN.md §5 in the truth brain mask (:func:`alsiron.evaluation.truth.score_chi`).

Background-removal stage (:func:`bfr_stage`): the phantom's TRUE total field (air, bone
and tissue sources) and true brain mask go through one background-field removal; the
local field is scored against the true local field, and χ from it (default inversion)
against the true χ. Whole chain (:func:`phase_chain`): magnitude and wrapped phase
through :func:`alsiron.qsm.chain.process_series`. Published leaders on the QSM-CI phantom:
26.5 % (dipole stage, tuned TV-ADMM), 28.1 % (background stage, iSMV), 39.1 % (total
field → χ), 68.3 % (phase → χ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

from alsiron import qsm
from alsiron.evaluation import metrics
from alsiron.evaluation.truth import PhantomTruth, score_chi
from alsiron.qsm import inversion
from alsiron.sim import phantom
from alsiron.sim.phantom import PhantomSession, simulate_subject
from alsiron.volume import MegreSeries


@dataclass(frozen=True)
class StageCase:
    """A phantom geometry: matrix, voxel size [mm], B0 direction (voxel-index space)."""

    name: str
    matrix: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0)
    seed: int = 3


#: The phantoms of the stage table (docs/qsm_stages.md).
CASES: dict[str, StageCase] = {
    "64-3mm": StageCase("64³, 3 mm", (64, 64, 64), (3.0, 3.0, 3.0)),
    "96-2mm": StageCase("96³, 2 mm", (96, 96, 96), (2.0, 2.0, 2.0)),
    "oblique": StageCase("64×64×56, 3×3×3.5 mm, B0 tilted 20°", (64, 64, 56),
                         (3.0, 3.0, 3.5), (0.0, 0.34, 0.94), seed=5),
}


def simulate(case: StageCase) -> phantom.PhantomSession:
    """Simulate the case's phantom session (default SNR and echo times)."""
    return phantom.simulate_subject(matrix=case.matrix, voxel_size=case.voxel_size,
                                    b0_direction=case.b0_direction, rng=case.seed)


def truth_of(session: phantom.PhantomSession) -> PhantomTruth:
    """The session's ground truth in the form :func:`~alsiron.evaluation.truth.score_chi` takes."""
    return PhantomTruth(chi=session.chi.astype(np.float64),
                        r2star=session.r2star.astype(np.float64),
                        brain_mask=session.brain_mask.astype(bool),
                        labels=session.labels.astype(np.int32),
                        label_names=dict(session.label_names))


def dipole_inputs(session: phantom.PhantomSession) -> dict[str, Any]:
    """Keyword arguments of :func:`alsiron.qsm.inversion.invert` for the dipole stage: the
    true local field, the brain mask, the echo-RSS magnitude and the phase per ppm at
    the mean echo time."""
    te = float(np.mean(session.echo_times))
    return {
        "local_field": session.local_field,
        "mask": session.brain_mask,
        "voxel_size": session.voxel_size,
        "b0_dir": tuple(float(v) for v in session.b0_direction),
        "magnitude": np.sqrt(np.sum(session.magnitude.astype(np.float64) ** 2, axis=0)),
        "phase_scale": inversion.phase_per_ppm(session.field_strength, te),
    }


def dipole_stage(session: phantom.PhantomSession, method: str,
                 settings: inversion.InversionSettings | None = None,
                 truth: PhantomTruth | None = None) -> dict[str, Any]:
    """Invert the true local field with ``method`` and score χ against the truth.

    Returns
    -------
    dict
        ``NRMSE_pct``, ``HFEN_pct``, ``XSIM``, ``DeepGreySlope``, ``DeepGreyR2`` (and the
        cortical contrasts) from :func:`~alsiron.evaluation.truth.score_chi`, plus ``seconds`` and
        the inversion's provenance ``record``.
    """
    truth = truth or truth_of(session)
    args = dipole_inputs(session)
    t0 = time.perf_counter()
    chi, record = inversion.invert(method, args.pop("local_field"), args.pop("mask"),
                                   settings=settings, **args)
    seconds = time.perf_counter() - t0
    chi = qsm.reference_to_mean(chi, session.brain_mask)
    scores = score_chi(chi, session.brain_mask, truth)
    scores["seconds"] = seconds
    scores["record"] = record
    return scores


@dataclass(frozen=True)
class StageScores:
    """Scores of one stage run (NRMSE in %, contrasts in ppm)."""

    method: str
    local_nrmse_pct: float
    chi_nrmse_pct: float
    chi_hfen_pct: float
    xsim: float
    deep_grey_slope: float
    deep_grey_r2: float
    mask_voxels: int
    seconds: float

    def as_row(self) -> dict[str, float | str | int]:
        """Plain dict for tables."""
        return dict(self.__dict__)


def simulate_stage_phantom(matrix: int | tuple[int, int, int] = 64,
                           voxel_size: float | tuple[float, float, float] = 3.0, *,
                           b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0),
                           snr: float | None = 100.0, seed: int = 3) -> PhantomSession:
    """The head phantom used for the stage tables (defaults: 64³, 3 mm, SNR 100, seed 3)."""
    return simulate_subject(matrix=matrix, voxel_size=voxel_size, b0_direction=b0_direction,
                            snr=snr, rng=seed)


def series_of(session: PhantomSession) -> MegreSeries:
    """The session's MEGRE data as the workflow takes it."""
    return MegreSeries(magnitude=np.ascontiguousarray(session.magnitude, np.float32),
                       phase=np.ascontiguousarray(session.phase, np.float32),
                       echo_times=np.asarray(session.echo_times, np.float64),
                       field_strength=session.field_strength, affine=session.affine,
                       voxel_size=tuple(session.voxel_size),
                       b0_direction=tuple(float(x) for x in session.b0_direction),
                       subject="phantom", session="01")


def local_field_inversion(settings: inversion.InversionSettings
                          ) -> inversion.InversionSettings:
    """``settings`` if its method inverts a local field, else the same settings with the
    two-step default (:data:`alsiron.qsm.inversion.TWO_STEP_DEFAULT`): a stage that scores
    a local field cannot run a single-step inversion, which takes the total field."""
    if settings.method in inversion.SINGLE_STEP_METHODS:
        return replace(settings, method=inversion.TWO_STEP_DEFAULT)
    return settings


def _scores(method: str, local: np.ndarray, valid: np.ndarray, session: PhantomSession,
            seconds: float, params, eval_mask: np.ndarray | None = None) -> StageScores:
    from alsiron.qsm.chain import QsmParameters, invert

    p = params or QsmParameters()
    truth = truth_of(session)
    valid = valid.astype(bool) & truth.brain_mask
    chi, _ = invert(local, valid, session.voxel_size, tuple(session.b0_direction),
                    local_field_inversion(p.inversion))
    chi = qsm.reference_to_mean(chi, valid)
    scored = valid if eval_mask is None else valid & eval_mask.astype(bool)
    s = score_chi(chi, scored, truth)
    valid = scored
    return StageScores(method=method,
                       local_nrmse_pct=metrics.nrmse(local, session.local_field, valid),
                       chi_nrmse_pct=s["NRMSE_pct"], chi_hfen_pct=s["HFEN_pct"],
                       xsim=s["XSIM"], deep_grey_slope=s.get("DeepGreySlope", float("nan")),
                       deep_grey_r2=s.get("DeepGreyR2", float("nan")),
                       mask_voxels=int(valid.sum()), seconds=seconds)


#: Erosion of the true brain mask before the background-removal stage: two one-voxel
#: erosions, fixed (not the chain's ``bfr_erode_mm``). The phantom's true total field is
#: the plain block mean of the fine-grid field, bone sub-voxels included, while its phase
#: is the signal-weighted complex mean: in the outer voxel layer of the true brain mask
#: the two differ by 321 ppb RMS (64³, 3 mm; 7.6 ppb one layer deeper, 1.6 ppb in the
#: interior), so that layer is no valid stage input (docs/qsm_mask_erosion.md).
STAGE_ERODE_VOXELS = 2


def stage_input_mask(session: PhantomSession, erode_mm: float | None) -> np.ndarray:
    """The true brain mask eroded by ``erode_mm`` [mm], or by :data:`STAGE_ERODE_VOXELS`."""
    mask = session.brain_mask.astype(bool)
    if erode_mm is None:
        return ndimage.binary_erosion(mask, iterations=STAGE_ERODE_VOXELS)
    return qsm.erode_mm(mask, tuple(session.voxel_size), erode_mm)


def bfr_stage(session: PhantomSession, method: str, *, erode_mm: float | None = None,
              params=None, eval_mask: np.ndarray | None = None) -> StageScores:
    """Background-removal stage from the TRUE total field and the true brain mask.

    Parameters
    ----------
    session : PhantomSession
        Simulated session (truth included).
    method : {"pdf", "vsharp", "ismv", "lbv"}
        Background-field removal.
    erode_mm : float, optional
        Erosion depth [mm] of the true brain mask before removal (default: the fixed
        :data:`STAGE_ERODE_VOXELS` one-voxel erosions, whatever the chain's erosion).
    params : QsmParameters, optional
        Parameters of the removal and of the inversion (workflow defaults otherwise).
    eval_mask : ndarray of bool, optional
        Score only here as well (e.g. a mask common to all methods, so that a method
        that erodes more is not rewarded for dropping the difficult rim).

    Returns
    -------
    StageScores
        Local-field NRMSE vs the true local field, χ NRMSE / HFEN / XSIM / deep-grey slope
        after the default inversion, all in the method's valid mask ∩ true brain
        (∩ ``eval_mask``).
    """
    import time

    from alsiron.qsm.chain import QsmParameters, remove_background, vsharp_radii

    base = params or QsmParameters()
    p = replace(base, background=replace(base.background, method=method))
    mask = stage_input_mask(session, erode_mm)
    series = series_of(session)
    radii = vsharp_radii(p.background, series.voxel_size)
    t0 = time.perf_counter()
    local, valid, _ = remove_background(session.total_field.astype(np.float32), mask, series,
                                        p.background, radii)
    seconds = time.perf_counter() - t0
    return _scores(method, local, valid.astype(bool), session, seconds, p, eval_mask)


def common_mask(session: PhantomSession, methods: list[str], *, erode_mm: float | None = None,
                params=None) -> np.ndarray:
    """Intersection of the valid masks of ``methods`` (from the true total field)."""

    from alsiron.qsm.chain import QsmParameters, remove_background, vsharp_radii

    base = (params or QsmParameters()).background
    mask = stage_input_mask(session, erode_mm)
    series = series_of(session)
    out = mask.copy()
    for method in methods:
        s = replace(base, method=method)
        radii = vsharp_radii(s, series.voxel_size)
        if method in ("ismv", "vsharp", "lbv"):
            _, valid, _ = remove_background(session.total_field.astype(np.float32), mask,
                                            series, s, radii)
            out &= valid.astype(bool)
    return out


def phase_chain(session: PhantomSession, params=None,
                eval_mask: np.ndarray | None = None) -> StageScores:
    """Whole chain from magnitude and wrapped phase (workflow.process_series), scored in
    its QSM mask ∩ true brain (∩ ``eval_mask``)."""
    import time

    from alsiron.qsm.chain import QsmParameters, process_series

    p = params or QsmParameters()
    t0 = time.perf_counter()
    result = process_series(series_of(session), p)
    seconds = time.perf_counter() - t0
    truth = truth_of(session)
    mask = result.qsm_mask.data.astype(bool) & truth.brain_mask
    if eval_mask is not None:
        mask &= eval_mask.astype(bool)
    chi = np.nan_to_num(result.chi.data)
    s = score_chi(chi, mask, truth)
    local = np.nan_to_num(result.local_field.data)
    return StageScores(method=f"{p.field.unwrapping}+{p.background.method}+{p.inversion.method}",
                       local_nrmse_pct=metrics.nrmse(local, session.local_field, mask),
                       chi_nrmse_pct=s["NRMSE_pct"], chi_hfen_pct=s["HFEN_pct"],
                       xsim=s["XSIM"], deep_grey_slope=s.get("DeepGreySlope", float("nan")),
                       deep_grey_r2=s.get("DeepGreyR2", float("nan")),
                       mask_voxels=int(mask.sum()), seconds=seconds)


def chain_inversions(session: PhantomSession, methods: list[tuple[str, Any]],
                     params=None, eval_mask: np.ndarray | None = None) -> list[StageScores]:
    """Whole chain once (:func:`alsiron.qsm.chain.process_series`), then every inversion of
    ``methods`` on the chain's own local field, QSM mask, magnitude and field SD, scored
    like :func:`phase_chain`. The first row is the chain's own χ (its default inversion).

    Parameters
    ----------
    session : PhantomSession
    methods : list of (str, InversionSettings or None)
        Inversion key of :data:`alsiron.qsm.inversion.INVERSION_METHODS` and its settings.
    params : QsmParameters, optional
        Parameters of the chain before the inversion.
    eval_mask : ndarray of bool, optional
        Score only here (∩ QSM mask ∩ true brain), e.g. :func:`stage_input_mask`, so
        that rows compare across chain settings that keep different rims.

    Returns
    -------
    list of StageScores
        ``method`` is the provenance name (with MEDI's α used).
    """
    from alsiron.qsm.chain import QsmParameters, inversion_inputs, process_series

    p = params or QsmParameters()
    t0 = time.perf_counter()
    series = series_of(session)
    result = process_series(series, p)
    seconds = time.perf_counter() - t0
    truth = truth_of(session)
    qsm_mask = result.qsm_mask.data.astype(bool)
    scored = qsm_mask & truth.brain_mask
    if eval_mask is not None:
        scored &= eval_mask.astype(bool)
    local = np.nan_to_num(result.local_field.data)
    local_nrmse = metrics.nrmse(local, session.local_field, scored)
    rss, scale = inversion_inputs(series)
    field_sd = None if result.field_sd is None else result.field_sd.data

    def row(name: str, chi: np.ndarray, secs: float) -> StageScores:
        s = score_chi(qsm.reference_to_mean(np.where(qsm_mask, chi, 0.0), qsm_mask), scored,
                      truth)
        return StageScores(method=name, local_nrmse_pct=local_nrmse,
                           chi_nrmse_pct=s["NRMSE_pct"], chi_hfen_pct=s["HFEN_pct"],
                           xsim=s["XSIM"], deep_grey_slope=s.get("DeepGreySlope", float("nan")),
                           deep_grey_r2=s.get("DeepGreyR2", float("nan")),
                           mask_voxels=int(scored.sum()), seconds=secs)

    rows = [row(f"chain default ({p.inversion.method})", np.nan_to_num(result.chi.data), seconds)]
    for method, settings in methods:
        t0 = time.perf_counter()
        chi, record = inversion.invert(method, local, qsm_mask,
                                       voxel_size=series.voxel_size,
                                       b0_dir=series.b0_direction, magnitude=rss,
                                       phase_scale=scale, settings=settings,
                                       field_sd=field_sd)
        name = record["Method"]
        if "AlphaUsed" in record:
            name += f" (α {record['AlphaUsed']:.2g})"
        rows.append(row(name, chi, time.perf_counter() - t0))
    return rows

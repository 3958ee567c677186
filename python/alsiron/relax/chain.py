"""The ``alsiron relax`` chain: R2*/T2* from MEGRE, R2/T2/B1 from MESE, R2' = R2* − R2.

Load → compute → maps with provenance; no file handling here (the CLI writes them).
R2 from the MESE grid is brought onto the MEGRE grid through the two affines (same
session, so world coordinates agree) by trilinear interpolation that ignores failed
(NaN) voxels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from alsiron import __version__, relax
from alsiron.errors import InvalidInputError
from alsiron.field import brain_mask as bm
from alsiron.field import echo_fit as fieldmap
from alsiron.grid import resample_to_grid
from alsiron.io.derivatives import DerivativeMap
from alsiron.volume import MegreSeries, MeseSeries, Volume

log = logging.getLogger("alsiron")

#: Brain mask of the relaxometry fits: Otsu threshold + opening of the echo-1 magnitude,
#: not the package default (:data:`alsiron.field.brain_mask.DEFAULT_BRAIN_MASK_METHOD`,
#: BET) that ``alsiron qsm`` uses: the two commands' masks differ (a later issue may
#: align them; that changes the relax outputs).
RELAX_BRAIN_MASK_METHOD = "otsu"

__all__ = ["MEGRE_OUTPUT_NAMES", "MESE_OUTPUT_NAMES", "RELAX_BRAIN_MASK_METHOD", "RelaxParameters",
           "RelaxResult", "output_names", "process_relax", "r2prime"]


@dataclass(frozen=True)
class RelaxParameters:
    """Options of :func:`process_relax`.

    Attributes
    ----------
    r2star_method : str
        One of :data:`alsiron.relax.r2star.R2STAR_METHODS`.
    noise_sigma : float or None
        Noise SD for the Rician NLLS and the CRLB maps; None estimates it from the
        residuals (CRLB) and fits the Gaussian model.
    mask_opening_voxels : int
        Opening of the brain mask from the echo-1 magnitude (as in ``alsiron qsm``).
    t1 : float
        T1 [s] assumed by the EPG fit.
    b0_gradient_correction : bool
        Divide the MEGRE magnitude by the sinc dephasing factor of the macroscopic field
        gradient (field from the multi-echo phase fit) before the R2* fit; voxels where
        any echo keeps less than ``min_gradient_factor`` of its signal stay uncorrected.
        On by default: every MEGRE series carries its phase, and without the correction
        R2* (hence R2') is biased upwards wherever the background field varies across a
        voxel (measured on the phantom: white-matter R2' +6 %; see docs/relax.md).
    min_gradient_factor : float
        See ``b0_gradient_correction``.
    """

    r2star_method: str = "weighted"
    noise_sigma: float | None = None
    mask_opening_voxels: int = 2
    t1: float = 1.0
    b0_gradient_correction: bool = True
    min_gradient_factor: float = 0.3


#: (BIDS suffix, desc entity) of every map of :meth:`RelaxResult.derivative_maps` from the
#: MEGRE, in writing order.
MEGRE_OUTPUT_NAMES: list[tuple[str, str | None]] = [
    ("R2starmap", "relax"), ("T2starmap", "relax"), ("S0map", "megre"),
    ("R2starmap", "crlbsd"), ("R2starmap", "rsquared"), ("status", "relaxr2starfit"),
    ("mask", "relaxbrain")]
#: ... and those written when the session has a MESE (R2, T2, B1, R2').
MESE_OUTPUT_NAMES: list[tuple[str, str | None]] = [
    ("R2map", None), ("T2map", None), ("TB1map", None), ("R2map", "rsquaredmese"),
    ("status", "epgfit"), ("R2primemap", None)]


def output_names(with_mese: bool) -> list[tuple[str, str | None]]:
    """(suffix, desc) of every map a session writes, with or without a MESE series."""
    return MEGRE_OUTPUT_NAMES + (MESE_OUTPUT_NAMES if with_mese else [])


@dataclass
class RelaxResult:
    """Maps on the MEGRE grid (R2, T2, B1 and their S0 also on it after resampling)."""

    r2star: relax.R2starResult
    t2fit: relax.T2Result | None
    brain_mask: np.ndarray
    r2_on_megre: np.ndarray | None
    t2_on_megre: np.ndarray | None
    b1_on_megre: np.ndarray | None
    r2prime: np.ndarray | None
    r2prime_summary: dict[str, Any]
    affine: np.ndarray
    mese_affine: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def derivative_maps(self) -> list[DerivativeMap]:
        """Every output map with its BIDS suffix (qMRI names; ``R2primemap`` for R2').

        The R2*/T2* maps, their status map and the brain mask carry ``desc-relax…``
        entities (``desc-relax_R2starmap``, ``desc-relax_T2starmap``,
        ``desc-relaxr2starfit_status``, ``desc-relaxbrain_mask``) because ``alsiron qsm``
        writes its own R2*/T2*/status/mask (no B0-gradient correction, its own mask) into
        the same session folder: each file has one owner, so running both commands, in
        either order, needs no ``--overwrite`` and leaves no doubt which fit a map is.
        """
        def vol(data: np.ndarray, units: str, extra: dict[str, Any] | None = None,
                affine: np.ndarray | None = None) -> Volume:
            return Volume(data=data, affine=self.affine if affine is None else affine,
                          units=units, provenance=extra or {})

        r = self.r2star
        codes = {"StatusCodes": {str(k): v for k, v in relax.R2STAR_STATUS.items()}}
        megre = [
            (vol(r.r2star, "1/s"), f"R2* (apparent transverse relaxation rate), {r.method} fit"),
            (vol(r.t2star, "s"), "T2* = 1/R2*"),
            (vol(r.s0, "arbitrary"), "MEGRE signal at TE = 0"),
            (vol(r.r2star_sd, "1/s"), "Cramér–Rao standard deviation of R2*"),
            (vol(r.gof, ""), "goodness of fit R² of the R2* model"),
            (vol(r.status, "", codes), "R2* fit status code per voxel (see StatusCodes)"),
            (vol(self.brain_mask.astype(np.uint8), ""),
             "brain mask (echo-1 magnitude) of the relaxometry fits"),
        ]
        maps = [DerivativeMap(suffix, v, text, desc=desc)
                for (suffix, desc), (v, text) in zip(MEGRE_OUTPUT_NAMES, megre, strict=True)]
        if self.t2fit is not None and self.r2_on_megre is not None:
            t = self.t2fit
            mese = [
                (vol(self.r2_on_megre, "1/s"), "R2 from the EPG fit of the MESE, resampled "
                 "to the MEGRE grid"),
                (vol(self.t2_on_megre, "s"), "T2 from the EPG fit"),
                (vol(self.b1_on_megre, "ratio"), "refocusing flip angle / nominal from the "
                 "EPG fit"),
                (vol(t.gof, "", None, self.mese_affine), "goodness of fit R² of the EPG model "
                 "(MESE grid)"),
                (vol(t.status, "", codes, self.mese_affine), "EPG fit status code per voxel "
                 "(MESE grid)"),
                (vol(self.r2prime, "1/s", {"NegativeValues": self.r2prime_summary}),
                 "R2' = R2* − R2 (negative values kept)"),
            ]
            maps += [DerivativeMap(suffix, v, text, desc=desc)
                     for (suffix, desc), (v, text) in zip(MESE_OUTPUT_NAMES, mese, strict=True)]
        return maps


def _onto_grid(data: np.ndarray, source_affine: np.ndarray, target_shape: tuple[int, ...],
              target_affine: np.ndarray) -> np.ndarray:
    """MESE ↔ MEGRE resampling: trilinear, NaN (failed fit) voxels left out of the
    weights, float32; grids equal to 1e-6 mm are not interpolated."""
    return resample_to_grid(data, source_affine, target_shape, target_affine, order=1,
                            nan_policy="ignore", grid_atol=1e-6)


def r2prime(r2star: np.ndarray, r2: np.ndarray, mask: np.ndarray, affine: np.ndarray
            ) -> tuple[np.ndarray, dict[str, Any]]:
    """R2' = R2* − R2 [s⁻¹] on one grid, negatives kept, with a summary of where.

    Returns
    -------
    r2prime : ndarray, float32
        NaN outside ``mask`` or where either input is NaN.
    summary : dict
        ``Voxels`` (finite in mask), ``NegativeVoxels``, ``NegativeFraction``,
        ``NegativeCentroid_mm`` (world coordinates; None when there is none) and
        ``NegativeMedian_per_s``.
    """
    out = (r2star.astype(np.float32) - r2.astype(np.float32))
    out[~np.asarray(mask, bool)] = np.nan
    finite = np.isfinite(out)
    negative = finite & (out < 0)
    n_neg = int(negative.sum())
    centroid = None
    if n_neg:
        idx = np.argwhere(negative).mean(axis=0)
        centroid = [round(float(c), 2) for c in (affine @ np.append(idx, 1.0))[:3]]
    summary = {
        "Voxels": int(finite.sum()),
        "NegativeVoxels": n_neg,
        "NegativeFraction": round(n_neg / max(int(finite.sum()), 1), 6),
        "NegativeCentroid_mm": centroid,
        "NegativeMedian_per_s": float(np.median(out[negative])) if n_neg else None,
    }
    if n_neg:
        log.info("R2': %d of %d voxels negative (%.2f %%)", n_neg, summary["Voxels"],
                 100 * summary["NegativeFraction"])
    return out, summary


def process_relax(megre: MegreSeries, mese: MeseSeries | None,
                  params: RelaxParameters | None = None) -> RelaxResult:
    """Fit R2*/T2* (MEGRE), R2/T2/B1 (MESE, EPG) and R2' for one session.

    Parameters
    ----------
    megre : MegreSeries
        Multi-echo gradient echo (magnitude used).
    mese : MeseSeries or None
        Multi-echo spin echo of the same session (any grid); None skips R2, T2, B1, R2'.
    params : RelaxParameters, optional

    Returns
    -------
    RelaxResult
    """
    p = params or RelaxParameters()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    brain = bm.brain_mask(megre.magnitude[0], method=RELAX_BRAIN_MASK_METHOD,
                          erode_voxels=p.mask_opening_voxels)
    if not brain.any():
        raise InvalidInputError("brain mask is empty: the magnitude has no distinct head signal")
    timings["brain_mask"] = time.perf_counter() - t0
    magnitude = megre.magnitude
    correction: dict[str, Any] = {"Applied": False}
    if p.b0_gradient_correction:
        t0 = time.perf_counter()
        fm = fieldmap.fit_multi_echo_field(megre.magnitude, megre.phase, megre.echo_times,
                                           brain, field_strength=megre.field_strength)
        factor = relax.gradient_dephasing_factor(fm.omega, megre.echo_times, brain)
        too_lossy = np.any(factor < p.min_gradient_factor, axis=0)
        factor[:, too_lossy] = 1.0
        magnitude = megre.magnitude / factor
        correction = {"Applied": True, "Method": "magnitude / Π sinc(∂ω/∂i·TE/2π), field "
                      "from the multi-echo phase fit", "MinFactor": p.min_gradient_factor,
                      "UncorrectedVoxels": int((too_lossy & brain).sum())}
        timings["b0_gradient"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r2s = relax.fit_r2star(magnitude, megre.echo_times, method=p.r2star_method,
                           mask=brain, noise_sigma=p.noise_sigma)
    timings["r2star"] = time.perf_counter() - t0
    t2fit = r2_m = t2_m = b1_m = rprime = None
    summary: dict[str, Any] = {}
    steps: dict[str, Any] = {
        "BrainMask": {"Method": "Otsu threshold of echo-1 MEGRE magnitude, opening"},
        "R2star": {"Method": p.r2star_method, "NoiseSigma": p.noise_sigma,
                   "EchoTime": [float(t) for t in megre.echo_times],
                   "Uncertainty": "Cramér–Rao SD at the fitted parameters",
                   "B0GradientCorrection": correction},
    }
    if mese is not None:
        t0 = time.perf_counter()
        mese_mask = _onto_grid(brain.astype(np.float32), megre.affine,
                               mese.magnitude.shape[1:], mese.affine)
        mese_mask = np.nan_to_num(mese_mask) > 0.25
        t2fit = relax.fit_t2_epg(mese.magnitude, mese.echo_spacing, mese.refocusing_angle,
                                 mask=mese_mask, t1=p.t1)
        timings["t2_epg"] = time.perf_counter() - t0
        shape = megre.magnitude.shape[1:]
        r2_m = _onto_grid(t2fit.r2, mese.affine, shape, megre.affine)
        t2_m = _onto_grid(t2fit.t2, mese.affine, shape, megre.affine)
        b1_m = _onto_grid(t2fit.b1, mese.affine, shape, megre.affine)
        for a in (r2_m, t2_m, b1_m):
            a[~brain] = np.nan
        rprime, summary = r2prime(r2s.r2star, r2_m, brain, megre.affine)
        steps["R2"] = {"Method": "EPG (CPMG) fit of S0, T2 and B1, Levenberg–Marquardt",
                       "EchoSpacing_s": mese.echo_spacing,
                       "RefocusingFlipAngle": mese.refocusing_angle, "T1_s": p.t1,
                       "Resampling": "trilinear through the affines, NaN-aware"}
        steps["R2prime"] = {"Method": "R2* − R2 on the MEGRE grid, negative values kept",
                            "Negative": summary}
    provenance = {
        "Software": {"Name": "alsiron", "Version": __version__},
        "Steps": steps,
        "Parameters": asdict(p),
        "Sources": list(megre.sources) + (list(mese.sources) if mese is not None else []),
    }
    return RelaxResult(r2star=r2s, t2fit=t2fit, brain_mask=brain, r2_on_megre=r2_m,
                       t2_on_megre=t2_m, b1_on_megre=b1_m, r2prime=rprime,
                       r2prime_summary=summary, affine=megre.affine,
                       mese_affine=None if mese is None else mese.affine, provenance=provenance,
                       timings_s=timings)

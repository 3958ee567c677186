"""The per-session QSM + R2* chain: MEGRE series in, maps and provenance out.

Order follows the 2024 ISMRM QSM consensus: brain mask from the first-echo magnitude,
echoes combined by a magnitude-weighted fit of the unwrapped phase over echo time
(before background removal), phase-quality masking with the fit residual, background
field removal (PDF by default; V-SHARP, iSMV or LBV), regularised dipole inversion,
whole-brain-mean referencing (or a given reference region).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

from alsiron import __version__, qsm, relax
from alsiron.errors import InvalidInputError
from alsiron.field import brain_mask as bm
from alsiron.field import echo_fit as fieldmap
from alsiron.io.derivatives import DerivativeMap
from alsiron.qsm import inversion as inv
from alsiron.volume import MegreSeries, Volume

log = logging.getLogger("alsiron")

#: Background-field removal methods of :class:`QsmParameters` ``bfr`` → provenance name.
BFR_METHODS: dict[str, str] = {"vsharp": "V-SHARP", "pdf": "PDF", "ismv": "iSMV",
                                "lbv": "LBV"}

#: Default depth [mm] eroded from the phase-quality brain mask before each background-
#: field removal (:attr:`QsmParameters.bfr_erode_mm` = None). PDF: 4 mm, measured with
#: ``bench/erosion_study.py`` (docs/qsm_mask_erosion.md). The SMV-based methods and LBV
#: keep the former depth at 3 mm (2 voxels = 6 mm): they lose the cortex to their own
#: erosion anyway, and with 4 mm the outer layer's unreliable field leaks into their
#: spheres (64³/3 mm, χ NRMSE on a common mask: V-SHARP 52.3 % vs 41.4 %, iSMV 38.4 vs
#: 37.8 %, LBV 85.0 vs 81.8 %).
BFR_ERODE_MM: dict[str, float] = {"pdf": 4.0, "vsharp": 6.0, "ismv": 6.0, "lbv": 6.0}

#: Spatial phase-unwrapping methods of :class:`QsmParameters` ``unwrapping``.
UNWRAPPING_METHODS: dict[str, str] = dict(fieldmap.UNWRAPPING_METHODS)

#: Called as ``progress(step_index, n_steps, message)`` before each step.
ProgressCallback = Callable[[int, int, str], None]


@dataclass
class QsmParameters:
    """Algorithm choices and parameters of the chain (defaults are the tuned values).

    Attributes
    ----------
    brain_mask_method : {"bet", "otsu"}
        Brain mask from the echo-1 magnitude (:data:`alsiron.qsm.dipole.BRAIN_MASK_METHODS`):
        "bet" = deformable surface model (Smith 2002; docs/brain_mask.md), "otsu" =
        threshold + opening + largest component.
    bet_f : float
        BET fractional intensity threshold in (0, 1); smaller values give a larger mask.
    mask_opening_voxels : int
        With "otsu": radius (voxels) of the erosion that separates brain from scalp
        before the largest connected component is kept (dilated back afterwards).
    residual_threshold : float
        Voxels whose magnitude-weighted RMS phase residual of the field fit exceeds this
        [rad] are excluded from the QSM mask (phase-quality masking).
    bfr_erode_mm : float or None
        Depth [mm] eroded from the phase-quality brain mask before background-field
        removal (:func:`alsiron.qsm.dipole.erode_mm`: voxels whose centre lies within this
        distance of a voxel outside the mask are dropped, anisotropic voxels measured in
        mm); None = the method's default in :data:`BFR_ERODE_MM`, or the largest voxel
        edge when that is deeper (the outer voxel layer always goes). The outermost voxels
        mix tissue with bone or air and their phase is unreliable, but the cortex — where
        ALS puts its iron — is the outer 6 mm of the brain. PDF's default, 4 mm, was
        chosen with ``bench/erosion_study.py`` (docs/qsm_mask_erosion.md): it removes one
        voxel layer at 3 mm and two at 2 mm, keeps 100 % of the deep and 94 % (3 mm) /
        67 % (2 mm) of the superficial precentral cortex (the former 2-voxel erosion:
        93 % / 15 % at 3 mm), doubles the deep-precentral − WM contrast at 3 mm (+24 vs
        +16 ppb of +43.5) and keeps χ NRMSE on a common evaluation mask within ±2
        points of the former erosion (3 mm 55.2 vs 56.0 %, 2 mm 41.5 vs 42.1 %, 1.5 mm
        45.2 vs 46.5 %, oblique 46.2 vs 44.2 %). 0 disables.
    bfr_erode_voxels : int or None
        Legacy erosion (the chain before the mm criterion): this many 6-connected
        one-voxel erosions, used instead of ``bfr_erode_mm`` when not None.
    bfr_trim_sd_factor : float or None
        Reliability trim after the erosion (off by default): voxels within
        ``bfr_trim_band_mm`` of the edge whose field SD exceeds this factor × the median
        field SD are dropped too. Measured worse than the plain 4 mm erosion on the
        phantom (docs/qsm_mask_erosion.md): the edge error there is systematic (partial
        volume with bone), not noise, so the field SD does not single it out.
    bfr_trim_band_mm : float
        Width [mm] of the edge band the reliability trim looks at.
    vsharp_radii_mm : tuple of float or None
        V-SHARP sphere radii in mm; None = :func:`default_vsharp_radii` (24 mm down to
        one voxel). Radii beyond the consensus' 12 mm keep more of the slowly varying
        local field: on the head phantom they lowered χ NRMSE from 110 % to 75 % (64³,
        3 mm) and raised the deep-grey slope from 0.79 to 0.86.
    vsharp_threshold : float
        Truncation of the V-SHARP deconvolution kernel.
    bfr : {"pdf", "vsharp", "ismv", "lbv"}
        Background-field removal method (see :data:`BFR_METHODS`). Default "pdf": on the
        head phantom (pipeline field fit and masks, the former 2-voxel erosion, TV-ADMM;
        measured with ``bench/bfr_accuracy.py``) it is the only method that keeps the cortical
        contrast, and it is as accurate as V-SHARP or better on the same voxels
        (details and the reasons in docs/qsm_bfr.md):

        ==================  =======  =======  =====  =====  =========  =========  ======
        phantom, method     χ NRMSE  common   XSIM   slope  GM−WM ppb  M1−WM ppb  GM vox
        ==================  =======  =======  =====  =====  =========  =========  ======
        64³ 3 mm  V-SHARP   44.9 %   44.9 %   0.395  0.87   +0.2       +1.6       1007
        64³ 3 mm  iSMV      38.8 %   38.8 %   0.517  0.85   (no GM)    (no GM)    0
        64³ 3 mm  LBV       84.0 %   84.0 %   0.217  0.82   -2.7       -0.2       1007
        64³ 3 mm  PDF       59.0 %   43.4 %   0.537  0.91   +13.9      +12.4      5412
        96³ 2 mm  V-SHARP   68.9 %   68.9 %   0.259  0.91   +0.9       +0.0       16963
        96³ 2 mm  iSMV      62.3 %   62.3 %   0.284  0.82   +0.5       +1.8       6269
        96³ 2 mm  LBV       95.0 %   95.0 %   0.143  0.81   +1.2       +4.4       16963
        96³ 2 mm  PDF       60.7 %   47.7 %   0.507  0.91   +14.9      +18.3      27756
        ==================  =======  =======  =====  =====  =========  =========  ======

        (true GM−WM +31.9 / +34.4 ppb, precentral−WM +38.4 / +40.7 ppb; "common" = χ
        NRMSE on V-SHARP's smaller mask, "χ NRMSE" on each method's own mask; PDF's own
        mask still holds the cortical rim that V-SHARP and iSMV erode away, which is why
        its own-mask NRMSE is higher at 3 mm.) iSMV's lower 3 mm NRMSE comes from a mask
        without any cortex. A control with the cortical excess removed from the field
        gives +3 ppb with PDF, so ≈ 11–12 of its ≈ 14 ppb are signal.
    pdf_tol, pdf_max_iter, pdf_pad_voxels : float, int, int
        PDF's CG tolerance, iteration cap and zero padding (voxels per axis).
    ismv_radius_mm : float or None
        iSMV sphere radius in mm; None = two (largest) voxel edges (Wen et al. 2014).
    ismv_tol, ismv_max_iter : float, int
        iSMV stopping tolerance and iteration cap.
    lbv_tol, lbv_max_iter : float, int
        LBV's CG tolerance and iteration cap.
    inversion : str
        Dipole inversion, a key of :data:`alsiron.qsm.inversion.INVERSION_METHODS`. Default
        "tvmasked": TV-ADMM with a masked data term (½‖M(Dχ − f)‖² + α‖∇χ‖₁,
        :func:`alsiron.qsm.inversion.tv_admm_masked`). On the head phantom (docs/qsm_stages.md)
        it beats every published leader with these defaults: dipole stage 15.5 / 14.8 /
        17.8 % (64³/3 mm, 96³/2 mm, oblique; leader 26.5 %), total field → χ 19.9 / 28.9 %
        (39.1 %), phase → χ 48.5–53.1 % in the stage-input mask (68.3 %), and it is the
        most accurate inversion in this chain in its own mask too (64³/3 mm seed 3: 64.9 %
        vs 69.1 % for the former default "tvadmm", 79.8 % iLSQR, 81.9 % RTS, 86.2 % MEDI).
        It gives 2.5–5 ppb less precentral − WM contrast than "tvadmm" in the chain (of
        ≈ 40 ppb true); the demo's ALS − control gap is +2.8 ppb (tvadmm +2.6).
    tkd_threshold : float
        TKD truncation of the dipole kernel.
    tv_alpha, tv_mu : float
        TV regularisation weight and ADMM penalty (field and χ in ppm).
    tv_max_iter : int
        Maximum ADMM iterations.
    tv_tol : float
        Stop when the relative change of χ per iteration falls below this.
    tikhonov_lambda, ilsqr_tol, ilsqr_max_iter, ilsqr_streaking, ilsqr_ill_threshold,
    ilsqr_streak_tol, ilsqr_streak_max_iter, tv_weak_harmonic, wh_alpha, wh_beta, wh_mu,
    masked_tv_alpha, masked_tv_mu_gradient, masked_tv_mu_data, masked_tv_max_iter,
    masked_tv_tol,
    medi_alpha, medi_edge_fraction, medi_mu_gradient, medi_mu_data, medi_max_iter, medi_tol,
    medi_nonlinear, medi_alpha_rule, medi_noise_factor, rts_delta, rts_mu, rts_rho,
    rts_max_iter, rts_tol, rts_lsqr_iter, ndi_lambda, ndi_step, ndi_max_iter, ndi_tol
        Parameters of the other inversions, as in
        :class:`alsiron.qsm.inversion.InversionSettings` (same names and defaults).
    r2star_weighted : bool
        Use the S²-weighted log-linear R2* fit.
    unwrapping : {"romeo", "laplacian", "echodiff"}
        Spatial phase unwrapping (see :data:`UNWRAPPING_METHODS`): "romeo" = MCPC-3D-S
        offset removal, ROMEO-weighted region growing of echo 1 and temporal unwrapping;
        "laplacian" = the same with FFT Laplacian unwrapping of echo 1; "echodiff" =
        region growing of the closest echo pair's phase difference (the first chain's).
    complex_fit : bool
        Refine the field by the nonlinear magnitude-weighted complex fit over echoes
        (otherwise the magnitude²-weighted linear fit of the unwrapped phase).
    """

    brain_mask_method: str = "bet"
    bet_f: float = 0.5
    mask_opening_voxels: int = 2
    residual_threshold: float = 0.5
    bfr_erode_mm: float | None = None
    bfr_erode_voxels: int | None = None
    bfr_trim_sd_factor: float | None = None
    bfr_trim_band_mm: float = 6.0
    vsharp_radii_mm: tuple[float, ...] | None = None
    vsharp_threshold: float = qsm.VSHARP_THRESHOLD
    bfr: str = "pdf"
    pdf_tol: float = qsm.PDF_TOL
    pdf_max_iter: int = qsm.PDF_MAX_ITER
    pdf_pad_voxels: int = qsm.PDF_PAD_VOXELS
    ismv_radius_mm: float | None = None
    ismv_tol: float = qsm.ISMV_TOL
    ismv_max_iter: int = qsm.ISMV_MAX_ITER
    lbv_tol: float = qsm.LBV_TOL
    lbv_max_iter: int = qsm.LBV_MAX_ITER
    inversion: str = "tvmasked"
    tkd_threshold: float = qsm.TKD_THRESHOLD
    tv_alpha: float = qsm.TV_ALPHA
    tv_mu: float = qsm.TV_MU
    tv_max_iter: int = 200
    tv_tol: float = 1e-3
    tikhonov_lambda: float = inv.InversionSettings.tikhonov_lambda
    ilsqr_tol: float = inv.InversionSettings.ilsqr_tol
    ilsqr_max_iter: int = inv.InversionSettings.ilsqr_max_iter
    ilsqr_streaking: bool = inv.InversionSettings.ilsqr_streaking
    ilsqr_ill_threshold: float = inv.InversionSettings.ilsqr_ill_threshold
    ilsqr_streak_tol: float = inv.InversionSettings.ilsqr_streak_tol
    ilsqr_streak_max_iter: int = inv.InversionSettings.ilsqr_streak_max_iter
    tv_weak_harmonic: bool = False
    wh_alpha: float = inv.InversionSettings.wh_alpha
    wh_beta: float = inv.InversionSettings.wh_beta
    wh_mu: float = inv.InversionSettings.wh_mu
    masked_tv_alpha: float = inv.InversionSettings.masked_tv_alpha
    masked_tv_mu_gradient: float = inv.InversionSettings.masked_tv_mu_gradient
    masked_tv_mu_data: float = inv.InversionSettings.masked_tv_mu_data
    masked_tv_max_iter: int = inv.InversionSettings.masked_tv_max_iter
    masked_tv_tol: float = inv.InversionSettings.masked_tv_tol
    medi_alpha: float = inv.InversionSettings.medi_alpha
    medi_edge_fraction: float = inv.InversionSettings.medi_edge_fraction
    medi_mu_gradient: float = inv.InversionSettings.medi_mu_gradient
    medi_mu_data: float = inv.InversionSettings.medi_mu_data
    medi_max_iter: int = inv.InversionSettings.medi_max_iter
    medi_tol: float = inv.InversionSettings.medi_tol
    medi_nonlinear: bool = inv.InversionSettings.medi_nonlinear
    medi_alpha_rule: str = inv.InversionSettings.medi_alpha_rule
    medi_noise_factor: float = inv.InversionSettings.medi_noise_factor
    rts_delta: float = inv.InversionSettings.rts_delta
    rts_mu: float = inv.InversionSettings.rts_mu
    rts_rho: float = inv.InversionSettings.rts_rho
    rts_max_iter: int = inv.InversionSettings.rts_max_iter
    rts_tol: float = inv.InversionSettings.rts_tol
    rts_lsqr_iter: int = inv.InversionSettings.rts_lsqr_iter
    ndi_lambda: float = inv.InversionSettings.ndi_lambda
    ndi_step: float = inv.InversionSettings.ndi_step
    ndi_max_iter: int = inv.InversionSettings.ndi_max_iter
    ndi_tol: float = inv.InversionSettings.ndi_tol
    r2star_weighted: bool = True
    unwrapping: str = "romeo"
    complex_fit: bool = True

    def inversion_settings(self) -> inv.InversionSettings:
        """The dipole-inversion parameters as :class:`~alsiron.qsm.inversion.InversionSettings`."""
        names = [f.name for f in fields(inv.InversionSettings)]
        return inv.InversionSettings(**{n: getattr(self, n) for n in names})


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
    return ["brain mask", "unwrapping + multi-echo field fit",
            f"{BFR_METHODS[bfr]} background removal",
            f"dipole inversion ({inversion})", "R2* fit"]


def process_series(series: MegreSeries, params: QsmParameters | None = None, *,
                   brain_mask: np.ndarray | None = None,
                   reference_mask: np.ndarray | None = None,
                   phase_unwrapped: bool = False,
                   total_field_ppm: np.ndarray | None = None,
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
    if p.unwrapping not in UNWRAPPING_METHODS:
        raise InvalidInputError(f"unknown phase unwrapping {p.unwrapping!r} "
                                f"(choose one of {', '.join(UNWRAPPING_METHODS)})")
    if p.inversion not in inv.INVERSION_METHODS:
        raise InvalidInputError(f"unknown dipole inversion {p.inversion!r} (choose one of "
                                f"{', '.join(inv.INVERSION_METHODS)})")
    if brain_mask is None and p.brain_mask_method not in bm.BRAIN_MASK_METHODS:
        raise InvalidInputError(f"unknown brain-mask method {p.brain_mask_method!r} (choose one of "
                                f"{', '.join(bm.BRAIN_MASK_METHODS)})")
    if p.bfr not in BFR_METHODS:
        raise InvalidInputError(f"unknown background-field removal {p.bfr!r} "
                                f"(choose one of {', '.join(BFR_METHODS)})")
    steps = _steps(p.inversion, p.bfr)
    timings: dict[str, float] = {}

    def step(i: int) -> float:
        if progress is not None:
            progress(i, len(steps), steps[i])
        return time.perf_counter()

    aff = series.affine
    vsz = series.voxel_size
    b0dir = series.b0_direction

    t0 = step(0)
    if brain_mask is None:
        brain = bm.brain_mask(series.magnitude[0], method=p.brain_mask_method,
                               voxel_size=vsz, bet_f=p.bet_f,
                               erode_voxels=p.mask_opening_voxels)
    else:
        brain = np.asarray(brain_mask, dtype=bool)
        if brain.shape != series.shape:
            raise InvalidInputError(f"brain mask has shape {brain.shape} but the data "
                                    f"{series.shape}")
    if not brain.any():
        raise InvalidInputError("brain mask is empty: the magnitude has no distinct head signal")
    timings["brain_mask"] = time.perf_counter() - t0

    t0 = step(1)
    field_sd = None
    if total_field_ppm is not None:
        total = np.asarray(total_field_ppm, dtype=np.float32)
        if total.shape != series.shape:
            raise InvalidInputError(f"field map has shape {total.shape} but the data "
                                    f"{series.shape}")
        total = np.where(brain, total, np.nan).astype(np.float32)
        quality = brain & np.isfinite(total)
        field_record: dict[str, Any] = {"Method": "total field map given as input",
                                        "Source": series.metadata.get("FieldMapSource",
                                                                      "array")}
    else:
        fm = fieldmap.estimate_field(series.magnitude, series.phase, series.echo_times,
                                     brain, field_strength=series.field_strength,
                                     unwrapping=p.unwrapping, phase_unwrapped=phase_unwrapped,
                                     complex_fit=p.complex_fit, voxel_size=vsz)
        total = fm.field_ppm
        field_sd = fm.field_sd_ppm
        quality = brain & np.isfinite(fm.residual) & (fm.residual <= p.residual_threshold)
        field_record = dict(fm.method)
    quality = bfr_input_mask(quality, vsz, p, field_sd=field_sd)
    timings["field_fit"] = time.perf_counter() - t0

    t0 = step(2)
    radii = (default_vsharp_radii(vsz) if p.vsharp_radii_mm is None
             else list(p.vsharp_radii_mm))
    local, qsm_mask, bfr_record = remove_background(np.nan_to_num(total), quality,
                                                    series, p, radii)
    qsm_mask = qsm_mask.astype(bool)
    if not qsm_mask.any():
        raise InvalidInputError(f"mask is empty after {BFR_METHODS[p.bfr]} erosion: the brain is "
                                "smaller than its sphere radius")
    timings["background_removal"] = time.perf_counter() - t0

    t0 = step(3)
    rss, phase_scale = inversion_inputs(series)
    chi, inv_params = invert(local, qsm_mask, vsz, b0dir, p, magnitude=rss,
                             phase_scale=phase_scale, progress=iteration_progress,
                             field_sd=field_sd)
    chi = qsm.reference_to_mean(chi, qsm_mask)
    referencing: dict[str, Any] = {"Method": "whole-brain mean over the QSM mask set to 0"}
    if reference_mask is not None:
        region = np.asarray(reference_mask, dtype=bool) & qsm_mask
        if region.sum() < 10:
            raise InvalidInputError(f"reference region has {int(region.sum())} voxels inside the "
                                    "QSM "
                                    "mask; need at least 10")
        offset = float(chi[region].mean())
        referencing = {"Method": "mean over the given reference region set to 0",
                       "Source": series.metadata.get("ReferenceSource", "array"),
                       "RegionVoxels": int(region.sum()),
                       "RegionMeanVsWholeBrain_ppm": offset,
                       "RegionSDVsWholeBrain_ppm": float(chi[region].std())}
        chi = np.where(qsm_mask, chi - np.float32(offset), np.float32(0.0))
    timings["inversion"] = time.perf_counter() - t0

    t0 = step(4)
    r2 = relax.fit_r2star_loglinear(series.magnitude, series.echo_times, mask=brain,
                                    weighted=p.r2star_weighted)
    timings["r2star"] = time.perf_counter() - t0

    provenance = pipeline_provenance(series, p, radii)
    provenance["Steps"]["BackgroundFieldRemoval"].update(bfr_record)
    provenance["Steps"]["DipoleInversion"].update(inv_params)
    provenance["Steps"]["Referencing"] = referencing
    provenance["Steps"]["FieldMap"] = field_record
    if total_field_ppm is not None:
        for key in ("PhaseUnwrapping", "EchoCombination", "PhaseQualityMask"):
            provenance["Steps"].pop(key, None)
    else:
        provenance["Steps"]["PhaseUnwrapping"] = {
            "Method": field_record.get("PhaseUnwrapping"),
            "PhaseOffsetRemoval": field_record.get("PhaseOffsetRemoval", "none")}
        provenance["Steps"]["EchoCombination"] = {
            "Method": field_record.get("EchoCombination"),
            "NoiseSigma": field_record.get("NoiseSigma")}
    if brain_mask is not None:
        provenance["Steps"]["BrainMask"] = {
            "Method": "given by the user",
            "Source": series.metadata.get("BrainMaskSource", "array")}
    provenance["QsmMaskVoxels"] = int(qsm_mask.sum())
    provenance["BrainMaskVoxels"] = int(brain.sum())
    vox_ml = math.prod(vsz) / 1000.0
    provenance["BrainMaskVolume_mL"] = round(float(brain.sum()) * vox_ml, 1)

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
        total_field=vol(np.where(brain, total, np.nan).astype(np.float32), "ppm"),
        local_field=vol(np.where(qsm_mask, local, np.nan).astype(np.float32), "ppm"),
        brain_mask=vol(brain.astype(np.uint8), ""),
        qsm_mask=vol(qsm_mask.astype(np.uint8), ""),
        provenance=provenance,
        timings_s=timings,
        field_sd=(None if field_sd is None
                  else vol(np.where(brain, field_sd, np.nan).astype(np.float32), "ppm")),
    )


def bfr_input_mask(quality: np.ndarray, voxel_size: tuple[float, float, float],
                   p: QsmParameters, *, field_sd: np.ndarray | None = None) -> np.ndarray:
    """The mask handed to background-field removal.

    The phase-quality brain mask ``quality`` eroded by ``p.bfr_erode_mm`` (Euclidean, in
    mm; :func:`alsiron.qsm.dipole.erode_mm`) or, when set, by the legacy ``p.bfr_erode_voxels``
    6-connected voxel erosions; then, with ``p.bfr_trim_sd_factor`` and a ``field_sd``
    map [ppm], the reliability trim: voxels within ``p.bfr_trim_band_mm`` of the edge
    whose field SD exceeds ``bfr_trim_sd_factor`` × the median field SD of ``quality``
    are dropped as well.
    """
    if p.bfr_erode_voxels is not None:
        if p.bfr_erode_voxels < 0:
            raise InvalidInputError(f"bfr_erode_voxels must be >= 0, got {p.bfr_erode_voxels}")
        mask = (ndimage.binary_erosion(quality, iterations=p.bfr_erode_voxels)
                if p.bfr_erode_voxels > 0 else quality.copy())
    else:
        mask = qsm.erode_mm(quality, voxel_size, erosion_depth_mm(p, voxel_size))
    if p.bfr_trim_sd_factor is not None:
        if not (p.bfr_trim_sd_factor > 0 and p.bfr_trim_band_mm >= 0):
            raise InvalidInputError("bfr_trim_sd_factor must be > 0 and bfr_trim_band_mm >= 0, got "
                                    f"{p.bfr_trim_sd_factor} and {p.bfr_trim_band_mm}")
    if p.bfr_trim_sd_factor is not None and field_sd is not None and mask.any():
        sd = np.asarray(field_sd, dtype=np.float64)
        finite = quality & np.isfinite(sd)
        if finite.any():
            reference = float(np.median(sd[finite]))
            sd = np.nan_to_num(sd, nan=np.inf)  # no SD (fit failed): unreliable
            band = mask & (qsm.edge_distance_mm(mask, voxel_size) <= p.bfr_trim_band_mm)
            mask = mask & ~(band & (sd > p.bfr_trim_sd_factor * reference))
    return mask


def erosion_depth_mm(p: QsmParameters, voxel_size: tuple[float, float, float]) -> float:
    """The pre-BFR erosion depth [mm]: ``p.bfr_erode_mm`` when given, else the method's
    default (:data:`BFR_ERODE_MM`) but at least the largest voxel edge, so that the outer
    voxel layer — partial volume with bone or air at any voxel size — always goes (no
    erosion was the worst setting at every resolution, docs/qsm_mask_erosion.md)."""
    if p.bfr_erode_mm is None:
        return max(BFR_ERODE_MM[p.bfr], max(float(v) for v in voxel_size))
    return float(p.bfr_erode_mm)


def erosion_record(p: QsmParameters, voxel_size: tuple[float, float, float]
                   ) -> dict[str, Any]:
    """Sidecar items of the pre-BFR erosion: ``MaskErosionMm`` always (for the legacy
    voxel erosion: voxels × the largest voxel edge, the depth it reaches along that
    axis), ``MaskErosionVoxels`` only in legacy mode, and how it was done."""
    record: dict[str, Any]
    if p.bfr_erode_voxels is not None:
        record = {"MaskErosionMm": float(p.bfr_erode_voxels) * max(voxel_size),
                  "MaskErosionVoxels": int(p.bfr_erode_voxels),
                  "MaskErosionMethod": "legacy: repeated 6-connected one-voxel erosions"}
    else:
        record = {"MaskErosionMm": erosion_depth_mm(p, voxel_size),
                  "MaskErosionMethod": "voxels whose centre lies within MaskErosionMm of a "
                                       "voxel outside the phase-quality brain mask removed "
                                       "(Euclidean distance in mm)"}
    if p.bfr_trim_sd_factor is not None:
        record["ReliabilityTrim"] = {"FieldSDFactor": p.bfr_trim_sd_factor,
                                     "BandMm": p.bfr_trim_band_mm,
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
           b0_dir: tuple[float, float, float], p: QsmParameters, *,
           magnitude: np.ndarray | None = None, phase_scale: float | None = None,
           progress: Callable[[int, int], None] | None = None,
           field_sd: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The dipole inversion chosen in ``p`` (χ [ppm], not yet referenced) and its
    run-time provenance; ``magnitude``, ``phase_scale`` [rad/ppm] and ``field_sd``
    [ppm] as in :func:`alsiron.qsm.inversion.invert`."""
    return inv.invert(p.inversion, local, mask, voxel_size=voxel_size, b0_dir=b0_dir,
                      magnitude=magnitude, phase_scale=phase_scale,
                      settings=p.inversion_settings(), progress=progress,
                      field_sd=field_sd)


def remove_background(field: np.ndarray, mask: np.ndarray, series: MegreSeries,
                      p: QsmParameters, radii: list[float]
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Run the chosen background-field removal.

    Returns the local field [ppm], the mask where it is valid and the run-time part of
    the provenance record (iterations run).
    """
    vsz = series.voxel_size
    if p.bfr == "pdf":
        local, n_iter = qsm.pdf(field, mask, voxel_size=vsz, b0_dir=series.b0_direction,
                                pad_voxels=p.pdf_pad_voxels, tol=p.pdf_tol,
                                max_iter=p.pdf_max_iter)
        return local, mask, {"IterationsRun": n_iter}
    if p.bfr == "ismv":
        local, eroded, n_iter = qsm.ismv(field, mask, voxel_size=vsz,
                                         radius_mm=p.ismv_radius_mm, tol=p.ismv_tol,
                                         max_iter=p.ismv_max_iter)
        return local, eroded, {"IterationsRun": n_iter}
    if p.bfr == "lbv":
        local, interior, n_iter = qsm.lbv(field, mask, voxel_size=vsz, tol=p.lbv_tol,
                                          max_iter=p.lbv_max_iter)
        return local, interior, {"IterationsRun": n_iter}
    local, eroded = qsm.vsharp(field, mask, voxel_size=vsz, radii_mm=radii,
                               threshold=p.vsharp_threshold)
    return local, eroded, {}


def _brain_mask_provenance(p: QsmParameters) -> dict[str, Any]:
    record: dict[str, Any] = {"Method": bm.BRAIN_MASK_METHODS.get(p.brain_mask_method,
                                                                   p.brain_mask_method)}
    if p.brain_mask_method == "bet":
        from alsiron.field import brain_mask as bet

        record.update({"FractionalIntensity": p.bet_f, "MaxIterations": bet.BET_ITERATIONS,
                       "SettleTolerance_mm_per_100_iterations": bet.BET_SETTLE_MM,
                       "SurfaceVertices": 10 * 4**bet.BET_SUBDIVISIONS + 2,
                       "Reference": "Smith SM, Hum Brain Mapp 17:143 (2002)"})
    else:
        record["OpeningVoxels"] = p.mask_opening_voxels
    return record


def _bfr_provenance(p: QsmParameters, series: MegreSeries, radii: list[float]
                    ) -> dict[str, Any]:
    record: dict[str, Any] = {"Method": BFR_METHODS[p.bfr]}
    record.update(erosion_record(p, series.voxel_size))
    if p.bfr == "pdf":
        record.update({"Reference": "Liu et al. NMR Biomed 2011;24:1129",
                       "Solver": "conjugate gradients on the normal equations, "
                                 "uniform weights, k-space dipole kernel",
                       "Tolerance": p.pdf_tol, "MaxIterations": p.pdf_max_iter,
                       "PaddingVoxels": p.pdf_pad_voxels})
    elif p.bfr == "ismv":
        radius = (2.0 * max(series.voxel_size) if p.ismv_radius_mm is None
                  else p.ismv_radius_mm)
        record.update({"Reference": "Wen et al. MRM 2014;72:1065", "Radius_mm": radius,
                       "Tolerance": p.ismv_tol, "MaxIterations": p.ismv_max_iter})
    elif p.bfr == "lbv":
        record.update({"Reference": "Zhou et al. NMR Biomed 2014;27:312",
                       "Solver": "conjugate gradients, 7-point Laplacian",
                       "Tolerance": p.lbv_tol, "MaxIterations": p.lbv_max_iter})
    else:
        record.update({"Reference": "Li et al. NeuroImage 2011;55:1645; Wu et al. MRM "
                                    "2012;67:137", "Radii_mm": radii,
                       "Threshold": p.vsharp_threshold})
    return record


def default_vsharp_radii(voxel_size: tuple[float, float, float]) -> list[float]:
    """V-SHARP radii [mm]: 24, 20, 16, 12, 9, 6, 3 mm (those above the largest voxel
    edge) and one voxel edge as the smallest."""
    vmax = max(voxel_size)
    return sorted({r for r in (24.0, 20.0, 16.0, 12.0, 9.0, 6.0, 3.0) if r > vmax} | {vmax},
                  reverse=True)


def pipeline_provenance(series: MegreSeries, p: QsmParameters,
                        radii: list[float]) -> dict[str, Any]:
    """Acquisition and processing record (the 2024 QSM consensus reporting items)."""
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
            "BrainMask": _brain_mask_provenance(p),
            "PhaseUnwrapping": {"Method": "quality-guided region growing (echo-difference "
                                "phase) + temporal unwrapping"},
            "EchoCombination": {"Method": "magnitude-weighted linear fit of unwrapped phase "
                                "over echo time (before background removal)"},
            "PhaseQualityMask": {"Method": "magnitude-weighted RMS phase residual of the "
                                 "field fit [rad]",
                                 "Threshold": p.residual_threshold},
            "BackgroundFieldRemoval": _bfr_provenance(p, series, radii),
            "DipoleInversion": {"Method": inv.INVERSION_METHODS[p.inversion]},
            "R2star": {"Method": "weighted log-linear" if p.r2star_weighted else "log-linear"},
        },
        "Parameters": asdict(p),
        "Sources": list(series.sources),
    }

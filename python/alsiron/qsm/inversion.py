"""Dipole inversion: local field [ppm] → susceptibility χ [ppm], every method alsiron has.

TKD, closed-form Tikhonov, iLSQR (its LSQR core), plain TV-ADMM, TV-ADMM with a masked
data term (the chain's default), TV-ADMM with a weak-harmonic background term
(FANSI-style), MEDI-style magnitude-weighted L1, RTS and NDI, and one dispatcher,
:func:`invert`, that the chain, the command line and the stage evaluation share; beside
them the single-step Laplacian TV with a local-field anchor (:func:`sstv_admm`, from the
total field's Laplacian, :func:`laplacian_data_term`), not in the dispatcher.

Arrays are 3-D on the acquisition grid (C order), voxel sizes in mm, the B0 direction in
voxel-index space; χ is 0 outside the mask and not referenced (see
:func:`alsiron.qsm.reference.reference_to_mean`). Iterative solvers release the GIL,
stop on Ctrl-C and call ``progress(iteration, max_iter)`` every few iterations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from alsiron import _core
from alsiron.arrays import (
    as_field_inputs,
    as_iterations,
    as_mask,
    as_tolerance,
    as_vec3,
    as_volume,
    as_weight,
)
from alsiron.constants import GAMMA_BAR_HZ_PER_T
from alsiron.errors import InvalidInputError

__all__ = [
    "INVERSION_METHODS",
    "InversionSettings",
    "edge_weight",
    "ilsqr",
    "ilsqr_fast_estimate",
    "invert",
    "invert_single_step",
    "laplacian_data_term",
    "laplacian_noise_map",
    "laplacian_noise_sd",
    "magnitude_weight",
    "medi",
    "ndi",
    "noise_scaled_alpha",
    "periodic_laplacian",
    "phase_per_ppm",
    "rts",
    "sstv_admm",
    "tikhonov",
    "tv_admm_masked",
    "tv_admm_weighted",
]

logger = logging.getLogger("alsiron")

#: Default TKD truncation threshold on |D| (Wharton et al. 2010 used 0.19-0.2).
TKD_THRESHOLD = 0.19

#: Default TV weight α (field in ppm, gradients in ppm/mm), tuned on the test phantom.
TV_ALPHA = 7e-4

#: Default ADMM penalty μ, tuned on the test phantom.
TV_MU = 7e-2

#: Default TV weight α of the single-step method "sstv" (Laplacian data in ppm/mm²).
SSTV_ALPHA = 2e-5

#: Default TV weight α of sstv's first pass, the one that refines the anchor
#: (:func:`alsiron.qsm.anchor.refine_anchor`): the two-step default's α (``masked_tv_alpha``).
#: The refinement carries the first pass's error into the anchor, and so into the final
#: χ; a first pass as regularised as the two-step default keeps that error low
#: (docs/qsm_anatomy.md, "The first pass").
SSTV_REFINE_ALPHA = 7e-4

#: c of sstv's noise rule, α = max(``sstv_alpha``, c·σ_L) [ppm/mm of χ gradient per
#: ppm/mm² of Laplacian noise] (:func:`laplacian_noise_sd`). The largest c that leaves α at
#: ``SSTV_ALPHA`` on every data set where that was validated (anatomical phantom at 1.5–2 mm,
#: SNR 100 and 40; qsm-forward; the geometric phantom: c·σ_L ≤ 2e-5 needs c ≤ 0.0084), since
#: a larger α there trades the deep-layer ALS excess for a lower NRMSE; it raises α where the
#: Laplacian of the field is mostly noise (docs/qsm_anatomy.md, "sstv's α and the noise").
SSTV_NOISE_FACTOR = 0.008

#: sstv's default ADMM penalties (the Rust kernel's too): μ₁ = this × α on ∇χ, and μ₂ on
#: the Laplacian split; μ₃ on the anchor split defaults to β.
SSTV_MU_GRADIENT_PER_ALPHA = 10.0
SSTV_MU_LAPLACIAN = 1.0


#: Inversion names accepted by :func:`invert` (and ``alsiron qsm --inversion``) → the
#: method's name in the provenance.
INVERSION_METHODS: dict[str, str] = {
    "tkd": "TKD",
    "tikhonov": "Tikhonov (gradient regularisation, closed form)",
    "ilsqr": "iLSQR (LSQR, fast QSM, streaking estimate and subtraction)",
    "tvadmm": "TV-ADMM",
    "tvmasked": "TV-ADMM, masked data term",
    "medi": "MEDI-style magnitude-weighted L1",
    "rts": "RTS",
    "ndi": "NDI",
    "sstv": "single-step TV: Laplacian of the total field plus the LBV local field",
}

#: Inversions that take the total field and the whole brain mask (no separate background
#: step decides their mask): :func:`invert_single_step` runs them, :func:`invert` refuses.
SINGLE_STEP_METHODS: tuple[str, ...] = ("sstv",)

#: The inversion that follows a separate background-field removal by default: the chain's
#: default until the single-step "sstv" replaced it, and what a local-field comparison
#: (the background-removal stage, ``--bfr`` alternatives) inverts with when the chain's own
#: inversion is single-step and so takes no local field.
TWO_STEP_DEFAULT = "tvmasked"

_REFERENCES: dict[str, str] = {
    "tkd": "Shmueli et al. MRM 2009;62:1510; Wharton et al. MRM 2010;63:1292",
    "tikhonov": "Bilgic et al. MRM 2014;72:1444 (closed-form L2 with gradient prior)",
    "ilsqr": "Li et al. NeuroImage 2015;108:111; Paige & Saunders ACM TOMS 1982;8:43",
    "tvadmm": "Bilgic et al. MRM 2014;72:1444; Milovic et al. MRM 2018;80:814 "
              "(weak-harmonic: Milovic et al. MRM 2019;81:3326)",
    "tvmasked": "Bilgic et al. MRM 2014;72:1444; Milovic et al. MRM 2018;80:814 "
                "(ADMM with the data term split off, FANSI)",
    "medi": "Liu et al. MRM 2011;66:777; Liu et al. MRM 2012;67:137",
    "rts": "Kames et al. NeuroImage 2018;167:276",
    "ndi": "Polak et al. NMR Biomed 2020;33:e4271",
    "sstv": "Langkammer et al. NeuroImage 2015;111:622 and Chatnuntawech et al. NMR "
            "Biomed 2017;30:e3570 (Laplacian single-step data term); Zhou et al. NMR "
            "Biomed 2014;27:312 (LBV local field as the low-frequency anchor)",
}


@dataclass(frozen=True)
class InversionSettings:
    """Parameters of every inversion (defaults measured on the head phantom's true local
    field, docs/qsm_stages.md); the dipole-inversion section of
    :class:`alsiron.qsm.chain.QsmParameters`.

    Frozen, so that the method checked on construction is the one that runs; make
    variants with :func:`dataclasses.replace`.

    Attributes
    ----------
    method : str
        The inversion the QSM chain runs, a key of :data:`INVERSION_METHODS` (checked on
        construction). :func:`invert` is told its method explicitly and ignores this
        one, so that one settings object serves every method of a comparison. Default
        "sstv": single-step Laplacian TV with the refined local-field anchor and the noise
        rule for α (:func:`invert_single_step`, :func:`alsiron.qsm.anchor.refine_anchor`).
        On the anatomical head phantom it meets every target of issue 13 at 1–2 mm, SNR
        100 and 40, B0 along z and tilted 15° (ALS deep-layer excess 0.80–0.84 of the
        truth, precentral − local WM contrast 0.74–0.86, ≤ 1.7 % of the precentral ribbon
        without χ, deep-grey slope 0.945–1.02, NRMSE below the two-step chain's), where the
        former default, "tvmasked" (:data:`TWO_STEP_DEFAULT`), keeps 0.45–0.49 of the
        excess and 0.42–0.48 of the contrast and leaves 24–26 % of the ribbon without χ
        (docs/qsm_anatomy.md). On the geometric phantom, whose compartments are flat and on
        which "tvmasked" was tuned, "tvmasked" stays ahead (64³, same voxels: 64.7 % vs
        70.5 % NRMSE).
    tkd_threshold : float
        TKD truncation of |D|.
    tikhonov_lambda : float
        Tikhonov gradient weight λ [mm²].
    ilsqr_tol, ilsqr_max_iter : float, int
        LSQR stopping tolerance (relative residual and normal-equation residual) and cap.
    ilsqr_streaking : bool
        Run iLSQR's fast-QSM, streaking-estimate and subtraction steps (False: LSQR core).
    ilsqr_ill_threshold : float
        |D| below which the streaking estimate acts (M_ic).
    ilsqr_streak_tol, ilsqr_streak_max_iter : float, int
        Stopping rule of the streaking LSQR.
    tv_alpha, tv_mu : float
        TV weight α and gradient ADMM penalty μ₁ of TV-ADMM.
    tv_max_iter, tv_tol : int, float
        TV-ADMM iteration cap and relative-change tolerance.
    tv_weak_harmonic : bool
        Estimate a residual harmonic background φ jointly (FANSI's weak-harmonic term).
    wh_alpha : float
        TV weight of the weak-harmonic variant (its data term is magnitude weighted, W ≤ 1,
        so it wants a smaller α than the unweighted TV-ADMM).
    wh_beta, wh_mu : float
        Weight β of ½‖M·Δφ‖² and its ADMM penalty.
    masked_tv_alpha : float
        TV weight α of TV-ADMM with the masked data term ("tvmasked", the two-step
        default); the plain TV-ADMM's 7e-4 (swept 3e-4–1.5e-3: 7e-4 is the best
        compromise of dipole stage and chain, docs/qsm_stages.md).
    masked_tv_mu_gradient, masked_tv_mu_data : float
        Its ADMM penalties on ∇χ and on the data split (≤ 1.5 NRMSE points between
        0.035–0.14 and 0.03–0.3 at 25–40 iterations; these converge fastest).
    masked_tv_max_iter, masked_tv_tol : int, float
        Its iteration cap and relative-change tolerance (2e-2: half the iterations of
        1e-2 for ≤ 1 NRMSE point).
    medi_alpha : float
        MEDI TV weight α (1/λ of MEDI's ½λ‖W(e^{iDχ} − e^{if})‖² + ‖G∇χ‖₁, field in ppm).
    medi_edge_fraction : float
        Fraction of mask voxels treated as edges (no TV) from the magnitude gradient.
    medi_mu_gradient, medi_mu_data : float
        ADMM penalties on ∇χ and on the data split.
    medi_max_iter, medi_tol : int, float
        MEDI iteration cap and tolerance.
    medi_nonlinear : bool
        Complex-exponential data term (needs the phase per ppm) instead of the linear one.
    medi_alpha_rule : {"noise", "fixed"}
        "noise": α = max(``medi_alpha``, ``medi_noise_factor``·σ_W) when a field-noise map
        is given to :func:`invert` (σ_W = median over the mask of W·σ_f, the noise of the
        weighted data term, :func:`noise_scaled_alpha`); ``medi_alpha`` without one.
        "fixed": always ``medi_alpha``.
    medi_noise_factor : float
        c of the noise rule (α per ppm of weighted field noise).
    rts_delta, rts_mu, rts_rho : float
        RTS well-conditioned threshold on |D|, k-space data weight and ADMM penalty.
    rts_max_iter, rts_tol : int, float
        RTS TV iterations and tolerance.
    rts_lsqr_iter : int
        LSQR iterations of RTS step 1 on the masked dipole model.
    ndi_lambda, ndi_step : float
        NDI Tikhonov weight and gradient step.
    ndi_max_iter, ndi_tol : int, float
        NDI iteration cap (its regularisation) and tolerance.
    sstv_alpha : float
        TV weight α of the single-step method "sstv" (its Laplacian data term is in
        ppm/mm², so α is on another scale than the two-step methods' α).
    sstv_beta : float
        Weight β of the anchor term β/2‖M_P(f_local − Dχ)‖² against the Laplacian term.
    sstv_erode_voxels : int
        One-voxel erosions of the brain mask before the Laplacian data term: its stencil
        must not reach the outer voxel layer, whose field carries partial-volume errors.
    sstv_clip_sd : float or None
        Laplacian voxels further than this many robust SDs (1.4826 × MAD) from the median
        are left out of the data term (None: none), then dilated by ``sstv_grow_voxels``.
    sstv_grow_voxels : int
        Dilation of the left-out voxels.
    sstv_max_iter, sstv_tol : int, float
        ADMM iteration cap and relative-change tolerance.
    sstv_refine_iter : int
        ADMM iterations of a first sstv pass that refines the anchor
        (:func:`alsiron.qsm.anchor.refine_anchor`): the anchor becomes LBV's local field of
        the total field less the first pass's brain field, plus that field. 0 = the anchor
        as the background-field removal gave it.
    sstv_refine_alpha : float or None
        TV weight α of that first pass (None: ``sstv_alpha``, as before the key existed).
        The first pass always runs its α as given (no noise rule).
    sstv_alpha_rule : {"noise", "fixed"}
        "noise": the final pass's α = max(``sstv_alpha``, ``sstv_noise_factor``·σ_L) when a
        field-noise map is given (σ_L: median noise SD of the Laplacian data term,
        :func:`laplacian_noise_sd`); ``sstv_alpha`` without one. "fixed": always
        ``sstv_alpha``.
    sstv_noise_factor : float
        c of the noise rule [ppm/mm of χ gradient per ppm/mm² of Laplacian noise].
    """

    tkd_threshold: float = TKD_THRESHOLD
    tikhonov_lambda: float = 2e-2
    ilsqr_tol: float = 1e-2
    ilsqr_max_iter: int = 50
    ilsqr_streaking: bool = True
    ilsqr_ill_threshold: float = 0.1
    ilsqr_streak_tol: float = 1e-2
    ilsqr_streak_max_iter: int = 50
    tv_alpha: float = TV_ALPHA
    tv_mu: float = TV_MU
    tv_max_iter: int = 200
    tv_tol: float = 1e-3
    tv_weak_harmonic: bool = False
    wh_alpha: float = 1e-4
    wh_beta: float = 1e3
    wh_mu: float = 1.0
    masked_tv_alpha: float = 7e-4
    masked_tv_mu_gradient: float = 0.14
    masked_tv_mu_data: float = 0.1
    masked_tv_max_iter: int = 200
    masked_tv_tol: float = 2e-2
    medi_alpha: float = 1e-4
    medi_edge_fraction: float = 0.3
    medi_mu_gradient: float = 0.1
    medi_mu_data: float = 1.0
    medi_max_iter: int = 200
    medi_tol: float = 1e-3
    medi_nonlinear: bool = True
    medi_alpha_rule: str = "noise"
    medi_noise_factor: float = 0.3
    rts_delta: float = 0.15
    rts_mu: float = 1e5
    rts_rho: float = 10.0
    rts_max_iter: int = 20
    rts_tol: float = 1e-2
    rts_lsqr_iter: int = 16
    ndi_lambda: float = 1e-3
    ndi_step: float = 2.0
    ndi_max_iter: int = 200
    ndi_tol: float = 1e-3
    sstv_alpha: float = SSTV_ALPHA
    sstv_beta: float = 1.0
    sstv_erode_voxels: int = 2
    sstv_clip_sd: float | None = 10.0
    sstv_grow_voxels: int = 1
    sstv_max_iter: int = 80
    sstv_tol: float = 1e-3
    sstv_refine_iter: int = 80
    sstv_refine_alpha: float | None = SSTV_REFINE_ALPHA
    sstv_alpha_rule: str = "noise"
    sstv_noise_factor: float = SSTV_NOISE_FACTOR
    method: str = "sstv"

    def __post_init__(self) -> None:
        if self.method not in INVERSION_METHODS:
            raise ValueError(f"unknown dipole inversion {self.method!r} (choose one of "
                             f"{', '.join(INVERSION_METHODS)})")
        if isinstance(self.sstv_refine_iter, bool) or not (
                isinstance(self.sstv_refine_iter, int) and self.sstv_refine_iter >= 0):
            raise ValueError(f"sstv_refine_iter must be an integer >= 0, "
                             f"got {self.sstv_refine_iter!r}")
        if self.sstv_refine_alpha is not None:
            _positive(self.sstv_refine_alpha, "sstv_refine_alpha")
        if self.sstv_alpha_rule not in ("noise", "fixed"):
            raise ValueError(f"sstv_alpha_rule must be 'noise' or 'fixed', "
                             f"got {self.sstv_alpha_rule!r}")
        _positive(self.sstv_noise_factor, "sstv_noise_factor", allow_zero=True)


# --------------------------------------------------------------------------- helpers


def _positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return v


def _inputs(local_field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
            b0_dir: Sequence[float]
            ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float],
                       tuple[float, float, float]]:
    """The checked local field [ppm], mask, voxel size [mm] and B0 direction of a method."""
    field, m, vs = as_field_inputs(local_field, mask, voxel_size, "local_field")
    return field, m, vs, as_vec3(b0_dir, "b0_dir", positive=False)


def _weight(weight: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray:
    # No weight weighs every voxel equally.
    return np.ones(shape, dtype=np.float32) if weight is None else as_weight(weight, shape, name)


def tkd(
    local_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    threshold: float = TKD_THRESHOLD,
) -> np.ndarray:
    """Truncated k-space division (TKD) dipole inversion.

    χ = F⁻¹{F{f·mask} · D⁺}, D⁺ = 1/D where |D| > t, sign(D)/t elsewhere, 0 at k = 0.

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local (background-removed) field in ppm.
    mask : ndarray of bool, shape (X, Y, Z)
        Region where the field is valid; the output is 0 outside it.
    voxel_size, b0_dir
        As in :func:`dipole_kernel`.
    threshold : float
        Truncation level t on |D|, in (0, 2/3]. Default 0.19.

    Returns
    -------
    ndarray, float32
        χ in ppm (not referenced; see :func:`reference_to_mean`).

    References
    ----------
    Shmueli K. et al., MRM 62:1510 (2009); Wharton S. et al., MRM 63:1292 (2010).
    """
    field = as_volume(local_field, "local_field")
    m = as_mask(mask, field.shape)
    if not (0.0 < float(threshold) <= 2.0 / 3.0):
        raise ValueError(f"threshold must be in (0, 2/3], got {threshold}")
    return _core.tkd(
        field,
        m,
        as_vec3(voxel_size, "voxel_size", positive=True),
        as_vec3(b0_dir, "b0_dir", positive=False),
        float(threshold),
    )


def tv_admm(
    local_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    alpha: float = TV_ALPHA,
    mu: float = TV_MU,
    max_iter: int = 100,
    tol: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """Total-variation regularised dipole inversion solved by ADMM (linear FANSI).

    Minimises ½‖D χ − f‖² + α‖∇χ‖₁ (periodic forward differences scaled by the voxel
    size) with the splitting z = ∇χ: each iteration is one k-space division (2 FFTs), a
    soft threshold at α/μ and a dual update. Interruptible with Ctrl-C.

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local field in ppm; values outside ``mask`` are ignored.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask; χ is 0 outside.
    voxel_size, b0_dir
        As in :func:`dipole_kernel`.
    alpha : float
        TV weight (ppm · mm/ppm). Default tuned on the alsiron test phantom.
    mu : float
        ADMM penalty; affects convergence speed, and the result at a finite iteration count.
    max_iter : int
        Iteration cap.
    tol : float
        Stop when ‖χₙ − χₙ₋₁‖/‖χₙ‖ < tol.
    progress : callable, optional
        Called as ``progress(iteration, max_iter)`` every few iterations; an exception
        it raises stops the solver and propagates.

    Returns
    -------
    chi : ndarray, float32
        χ in ppm (not referenced).
    n_iter : int
        Iterations run.

    References
    ----------
    Bilgic B. et al., MRM 72:1444 (2014); Milovic C. et al., MRM 80:814 (2018).
    """
    field = as_volume(local_field, "local_field")
    m = as_mask(mask, field.shape)
    if not (np.isfinite(alpha) and alpha >= 0 and np.isfinite(mu) and mu > 0):
        raise ValueError(f"need alpha >= 0 and mu > 0, got alpha={alpha}, mu={mu}")
    if int(max_iter) < 1 or not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"need max_iter >= 1 and tol >= 0, got {max_iter}, {tol}")
    chi, n_iter = _core.tv_admm(
        field,
        m,
        as_vec3(voxel_size, "voxel_size", positive=True),
        as_vec3(b0_dir, "b0_dir", positive=False),
        float(alpha),
        float(mu),
        int(max_iter),
        float(tol),
        progress,
    )
    logger.debug("tv_admm stopped after %d iterations", n_iter)
    return chi, int(n_iter)


def phase_per_ppm(field_strength: float, echo_time: float) -> float:
    """Phase [rad] that 1 ppm of field accrues at ``echo_time`` [s] and B0 [T]:
    2π·γ̄·B0·TE·10⁻⁶ (≈ 16.1 rad/ppm at 3 T, 20 ms)."""
    b0 = _positive(field_strength, "field_strength")
    te = _positive(echo_time, "echo_time")
    return 2.0 * math.pi * GAMMA_BAR_HZ_PER_T * b0 * te * 1e-6


def magnitude_weight(magnitude: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Data weight from the magnitude (field noise ∝ 1/magnitude): magnitude divided by its
    99th percentile inside ``mask``, clipped to [0, 1], 0 outside.

    Parameters
    ----------
    magnitude : ndarray, shape (X, Y, Z)
        Magnitude image (any units), e.g. the root-sum-of-squares over echoes.
    mask : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    ndarray, float32
    """
    mag = as_volume(magnitude, "magnitude")
    m = as_mask(mask, mag.shape) != 0
    top = float(np.percentile(np.abs(mag[m]), 99))
    if not top > 0:
        raise InvalidInputError("magnitude is zero inside the mask; cannot weight the data by it")
    return np.where(m, np.clip(np.abs(mag) / top, 0.0, 1.0), 0.0).astype(np.float32)


def edge_weight(magnitude: np.ndarray, mask: np.ndarray, *, voxel_size: Sequence[float],
                edge_fraction: float = 0.1) -> np.ndarray:
    """MEDI's gradient weight: 0 on the ``edge_fraction`` of mask voxels with the largest
    magnitude-gradient norm (per mm), 1 elsewhere (float32)."""
    mag = as_volume(magnitude, "magnitude")
    m = as_mask(mask, mag.shape)
    if not 0.0 <= float(edge_fraction) < 1.0:
        raise ValueError(f"edge_fraction must be in [0, 1), got {edge_fraction}")
    vs = as_vec3(voxel_size, "voxel_size", positive=True)
    return _core.edge_weight(mag, m, vs, float(edge_fraction))


def noise_scaled_alpha(field_sd: np.ndarray, weight: np.ndarray, mask: np.ndarray, *,
                       base_alpha: float, factor: float) -> tuple[float, float]:
    """Noise-aware TV weight: α = max(``base_alpha``, ``factor``·σ_W).

    σ_W is the median over the mask (where σ_f is finite and positive) of W·σ_f, the
    standard deviation of the weighted data residual W·(Dχ − f) that noise alone leaves
    at the true χ. TV denoising wants α ∝ σ; ``base_alpha`` is the weight for
    (near-)noiseless data, so the rule changes nothing until the noise is large.

    Parameters
    ----------
    field_sd : ndarray, shape (X, Y, Z)
        Field noise σ_f [ppm] (e.g. :attr:`alsiron.field.echo_fit.FieldEstimate.field_sd_ppm`).
    weight : ndarray, shape (X, Y, Z)
        Data weight W of the inversion (:func:`magnitude_weight`).
    mask : ndarray of bool, shape (X, Y, Z)
    base_alpha, factor : float
        Floor of α, and α per ppm of σ_W.

    Returns
    -------
    alpha : float
    sigma_w : float
        σ_W [ppm] (0 when no voxel has a usable σ_f).
    """
    sd = np.asarray(field_sd, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if sd.shape != m.shape:
        raise ValueError(f"field_sd has shape {sd.shape}, expected {m.shape}")
    usable = m & np.isfinite(sd) & (sd > 0)
    sigma_w = float(np.median((np.asarray(weight, np.float64) * sd)[usable])) if usable.any() \
        else 0.0
    base = _positive(base_alpha, "base_alpha", allow_zero=True)
    return max(base, _positive(factor, "factor", allow_zero=True) * sigma_w), sigma_w


def laplacian_noise_map(field_sd: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Per-voxel noise SD [ppm/mm²] that independent field noise σ_f leaves in the periodic
    7-point Laplacian of the field, the data of :func:`sstv_admm`:
    σ_L² = Σᵢ (σ²[+1] + σ²[−1]) / hᵢ⁴ + (Σᵢ 2/hᵢ²)² σ² (√42·σ_f/h² for isotropic h).

    Parameters
    ----------
    field_sd : ndarray, shape (X, Y, Z)
        Field noise σ_f [ppm]; non-finite or non-positive voxels count as unknown (no noise
        to their neighbours, NaN themselves).
    voxel_size : sequence of 3 floats
        Voxel size [mm].

    Returns
    -------
    ndarray, float64
        σ_L [ppm/mm²], NaN where σ_f is unknown.
    """
    sd = np.asarray(field_sd, dtype=np.float64)
    usable = np.isfinite(sd) & (sd > 0)
    var = np.where(usable, sd * sd, 0.0)
    h = as_vec3(voxel_size, "voxel_size", positive=True)
    out = sum(2.0 / (hi * hi) for hi in h) ** 2 * var
    for axis, hi in enumerate(h):
        out += (np.roll(var, 1, axis) + np.roll(var, -1, axis)) / hi ** 4
    return np.where(usable, np.sqrt(out), np.nan)


def laplacian_noise_sd(field_sd: np.ndarray, mask: np.ndarray,
                       voxel_size: Sequence[float]) -> float:
    """σ_L [ppm/mm²]: median over ``mask`` of :func:`laplacian_noise_map`, 0 when no voxel
    of the mask has a usable σ_f. The Laplacian amplifies the field noise by about √42 / h²,
    so at fine voxels or low SNR its data are mostly noise where at 2 mm and SNR 100 they
    are not."""
    return noise_scaled_alpha(laplacian_noise_map(field_sd, voxel_size), np.float64(1.0),
                              mask, base_alpha=0.0, factor=1.0)[1]


# --------------------------------------------------------------------------- methods


def tikhonov(local_field: np.ndarray, mask: np.ndarray, *, voxel_size: Sequence[float],
             b0_dir: Sequence[float], lam: float = 2e-2) -> np.ndarray:
    """Closed-form Tikhonov inversion with gradient regularisation.

    χ = F⁻¹{D·F{f·M} / (D² + λ·Σₐ|Eₐ|²)}, Eₐ the k-space symbols of the forward
    differences along each axis divided by the voxel size (anisotropic voxels honoured).

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local field [ppm]; ignored outside ``mask``.
    mask : ndarray of bool, shape (X, Y, Z)
    voxel_size : 3 floats
        Voxel edges [mm].
    b0_dir : 3 floats
        B0 direction in voxel-index space.
    lam : float
        λ [mm²] (weight of ‖∇χ‖² against ‖Dχ − f‖²).

    Returns
    -------
    ndarray, float32
        χ [ppm], 0 outside the mask.
    """
    field, m, vs, b0 = _inputs(local_field, mask, voxel_size, b0_dir)
    return _core.tikhonov(field, m, vs, b0, _positive(lam, "lam"))


def ilsqr_fast_estimate(local_field: np.ndarray, mask: np.ndarray, *,
                        voxel_size: Sequence[float], b0_dir: Sequence[float]) -> np.ndarray:
    """iLSQR's fast QSM estimate χ_fs (Li et al. 2015, eqs. 8–14).

    χ̂ = sgn(D)·F{f·M}; where |D| is small (k-space weight from |D|^0.001 between its 1st
    and 30th percentile) the estimate is replaced by its 3 mm spherical mean, twice, with
    the mask applied in between; the result is scaled to TKD (threshold 1/8) by the
    least-squares line a·χ + b over the mask. Used for the gradient weights of the
    streaking estimate.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_dir
        As in :func:`tikhonov`.

    Returns
    -------
    ndarray, float32
        χ_fs [ppm], 0 outside the mask.
    """
    field, m, vs, b0 = _inputs(local_field, mask, voxel_size, b0_dir)
    return _core.ilsqr_fast_estimate(field, m, vs, b0)


def _ilsqr_run(local_field, mask, *, voxel_size, b0_dir, weight, tol, max_iter, streaking,
               ill_threshold, streak_tol, streak_max_iter, progress
               ) -> tuple[np.ndarray, int, int]:
    field, m, vs, b0 = _inputs(local_field, mask, voxel_size, b0_dir)
    n, t = as_iterations(max_iter), as_tolerance(tol)
    w = _weight(weight, field.shape, "weight")
    if not streaking:
        chi, it = _core.ilsqr(field, w, m, vs, b0, t, n, progress)
        return chi, int(it), 0
    if not 0 < float(ill_threshold) < 2.0 / 3.0:
        raise ValueError(f"ill_threshold must be in (0, 2/3), got {ill_threshold}")
    ns, ts = (as_iterations(streak_max_iter, "streak_max_iter"),
              as_tolerance(streak_tol, "streak_tol"))
    chi, it, it_streak = _core.ilsqr_streaking(field, w, m, vs, b0, t, n,
                                               float(ill_threshold), ts, ns, progress)
    return chi, int(it), int(it_streak)


def ilsqr(local_field: np.ndarray, mask: np.ndarray, *, voxel_size: Sequence[float],
          b0_dir: Sequence[float], weight: np.ndarray | None = None, tol: float = 1e-2,
          max_iter: int = 50, streaking: bool = True, ill_threshold: float = 0.1,
          streak_tol: float = 1e-2, streak_max_iter: int = 50,
          progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """iLSQR (Li et al. 2015): LSQR, fast QSM estimate, streaking estimate, subtraction.

    Step 1: LSQR on the weighted dipole model W·F⁻¹DF·χ = W·f, regularised by early
    stopping (``tol`` on ‖r‖/‖b‖ and on ‖Aᵀr‖/(‖A‖‖r‖), or ``max_iter``). Step 2: the
    fast estimate χ_fs (:func:`ilsqr_fast_estimate`). Step 3: the streaking artefact
    χ_sa = argmin ‖W_G∘∇F⁻¹M_icF·x − W_G∘∇χ_LSQR‖² by LSQR, M_ic = |D| < ``ill_threshold``,
    W_G per axis 1 below the 50th and 0 above the 70th percentile of |∂ₐχ_fs| in the mask
    (linear in between). Step 4: χ = M·(χ_LSQR − χ_sa). ``streaking=False`` stops after
    step 1 (the LSQR core alone).

    Parameters
    ----------
    local_field, mask, voxel_size, b0_dir
        As in :func:`tikhonov`.
    weight : ndarray, shape (X, Y, Z), optional
        Data weight W ≥ 0 of step 1 (e.g. :func:`magnitude_weight`); 1 inside the mask by
        default.
    tol, max_iter : float, int
        Stopping rule of step 1.
    streaking : bool
        Run steps 2–4.
    ill_threshold : float
        |D| below which k-space is ill-conditioned (in (0, 2/3)).
    streak_tol, streak_max_iter : float, int
        Stopping rule of the streaking LSQR (same form as ``tol``).
    progress : callable, optional
        ``progress(iteration, max_iter + streak_max_iter)`` over both LSQR runs.

    Returns
    -------
    chi : ndarray, float32
        χ [ppm], 0 outside the mask.
    n_iter : int
        LSQR iterations run, both solves together.
    """
    chi, it, it_streak = _ilsqr_run(local_field, mask, voxel_size=voxel_size, b0_dir=b0_dir,
                                    weight=weight, tol=tol, max_iter=max_iter,
                                    streaking=streaking, ill_threshold=ill_threshold,
                                    streak_tol=streak_tol, streak_max_iter=streak_max_iter,
                                    progress=progress)
    return chi, it + it_streak


def tv_admm_weighted(local_field: np.ndarray, mask: np.ndarray, *,
                     voxel_size: Sequence[float], b0_dir: Sequence[float],
                     weight: np.ndarray | None = None, tv_weight: np.ndarray | None = None,
                     alpha: float = TV_ALPHA, mu_gradient: float = TV_MU,
                     mu_data: float = 1.0, max_iter: int = 200, tol: float = 1e-3,
                     phase_scale: float | None = None,
                     weak_harmonic: tuple[float, float] | None = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> tuple[np.ndarray, int]:
    """Weighted TV inversion by ADMM, optionally nonlinear and with a weak-harmonic term.

    Minimises Σ W²·ρ(Dχ + φ − f) + α‖G∘∇χ‖₁ + β/2‖M·Δφ‖² over χ (and φ when
    ``weak_harmonic`` is given), ρ(r) = r²/2, or (1 − cos(s·r))/s² with s =
    ``phase_scale`` [rad/ppm] (the complex-exponential misfit of FANSI/MEDI). The
    weak-harmonic φ absorbs background field left by background removal.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_dir
        As in :func:`tikhonov`.
    weight : ndarray, optional
        Data weight W (1 inside the mask by default); 0 outside the mask always.
    tv_weight : ndarray, optional
        Per-voxel TV weight G (e.g. :func:`edge_weight`), 1 by default.
    alpha : float
        TV weight [ppm field per ppm/mm χ gradient].
    mu_gradient, mu_data : float
        ADMM penalties on ∇χ and on the data split.
    max_iter, tol : int, float
        Iteration cap; stop when ‖χₙ − χₙ₋₁‖/‖χₙ‖ < tol.
    phase_scale : float, optional
        Phase per ppm [rad/ppm] for the nonlinear data term.
    weak_harmonic : (beta, mu), optional
        Weak-harmonic weight β and its ADMM penalty.
    progress : callable, optional

    Returns
    -------
    chi : ndarray, float32
        χ [ppm], 0 outside the mask (not referenced).
    n_iter : int
        ADMM iterations run.
    """
    field, m, vs, b0 = _inputs(local_field, mask, voxel_size, b0_dir)
    n, t = as_iterations(max_iter), as_tolerance(tol)
    w = _weight(weight, field.shape, "weight")
    g = None if tv_weight is None else _weight(tv_weight, field.shape, "tv_weight")
    s = None if phase_scale is None else _positive(phase_scale, "phase_scale")
    wh_beta = wh_mu = None
    if weak_harmonic is not None:
        wh_beta = _positive(weak_harmonic[0], "weak-harmonic beta")
        wh_mu = _positive(weak_harmonic[1], "weak-harmonic mu")
    chi, it = _core.weighted_tv_admm(
        field, w, g, m, vs, b0, _positive(alpha, "alpha", allow_zero=True),
        _positive(mu_gradient, "mu_gradient"), _positive(mu_data, "mu_data"), n, t, s,
        wh_beta, wh_mu, progress)
    return chi, int(it)


def tv_admm_masked(local_field: np.ndarray, mask: np.ndarray, *,
                   voxel_size: Sequence[float], b0_dir: Sequence[float],
                   alpha: float = 7e-4, mu_gradient: float = 0.14, mu_data: float = 0.1,
                   max_iter: int = 200, tol: float = 2e-2,
                   progress: Callable[[int, int], None] | None = None
                   ) -> tuple[np.ndarray, int]:
    """TV-ADMM with a masked data term: min ½‖M·(Dχ − f)‖² + α‖∇χ‖₁.

    The plain TV-ADMM (:func:`tv_admm`) fits ½‖Dχ − M·f‖² over the whole
    grid, i.e. it asks for zero field outside the mask, where the brain's own χ does make
    field; here the data term sees the mask only (W = M in :func:`tv_admm_weighted`:
    linear, unweighted, no edge mask), solved by ADMM with the data term split off
    (z₂ = Dχ), two FFT pairs per iteration. χ is free on the whole grid, then masked.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_dir
        As in :func:`tikhonov`.
    alpha : float
        TV weight [ppm field per ppm/mm χ gradient] (the plain TV-ADMM's).
    mu_gradient, mu_data : float
        ADMM penalties on ∇χ and on the data split (convergence speed only).
    max_iter, tol : int, float
        Iteration cap; stop when ‖χₙ − χₙ₋₁‖/‖χₙ‖ < tol.
    progress : callable, optional
        ``progress(iteration, max_iter)``.

    Returns
    -------
    chi : ndarray, float32
        χ [ppm], 0 outside the mask.
    n_iter : int
    """
    return tv_admm_weighted(local_field, mask, voxel_size=voxel_size, b0_dir=b0_dir,
                            weight=None, alpha=alpha,
                            mu_gradient=mu_gradient, mu_data=mu_data, max_iter=max_iter,
                            tol=tol, progress=progress)


def sstv_admm(laplacian_data: np.ndarray, laplacian_weight: np.ndarray,
              local_field: np.ndarray, local_weight: np.ndarray, *,
              voxel_size: Sequence[float], b0_dir: Sequence[float], alpha: float,
              beta: float, mu1: float | None = None, mu2: float = SSTV_MU_LAPLACIAN,
              mu3: float | None = None, tol: float = 1e-3, max_iter: int = 100,
              progress: Callable[[int, int], None] | None = None
              ) -> tuple[np.ndarray, int]:
    """Single-step Laplacian TV with a local-field anchor, by ADMM:
    min_χ ½‖W_L^½(g − L·D·χ)‖² + (β/2)‖W_P^½(f − D·χ)‖² + α‖∇χ‖₁.

    g is the periodic 7-point Laplacian of the brain-masked total field (the Laplacian
    removes the harmonic background; :func:`laplacian_data_term` builds g and W_L), f a
    local field that anchors what the Laplacian term constrains weakly (low spatial
    frequencies), D the dipole kernel, L the same 7-point Laplacian and ∇ periodic forward
    differences per mm. Three splits (z₁ = ∇χ, z₂ = L·D·χ, z₃ = D·χ), all diagonal in
    k-space for the χ-update: two forward and two inverse real FFTs per iteration
    (``_core.sstv_admm``; GIL released). Stops after at least 10 iterations when
    ‖χₙ − χₙ₋₁‖/‖χₙ‖ < ``tol``, or at ``max_iter``.

    Parameters
    ----------
    laplacian_data : ndarray, shape (X, Y, Z)
        g [ppm/mm²], the Laplacian of the total field (0 where W_L = 0).
    laplacian_weight : ndarray, shape (X, Y, Z)
        W_L ≥ 0 (unitless; a 0/1 mask or real weights).
    local_field : ndarray, shape (X, Y, Z)
        f [ppm], e.g. from LBV.
    local_weight : ndarray, shape (X, Y, Z)
        W_P ≥ 0 (unitless).
    voxel_size : sequence of 3 floats
        Voxel size [mm].
    b0_dir : sequence of 3 floats
        B0 direction in voxel-index space (any length).
    alpha : float
        TV weight α ≥ 0 [ppm/mm² of Laplacian data per ppm/mm of χ gradient].
    beta : float
        Anchor weight β ≥ 0 relative to the Laplacian term [mm⁻⁴] (0: Laplacian term only).
    mu1, mu2, mu3 : float, optional
        ADMM penalties on ∇χ, L·D·χ and D·χ (convergence speed, not the minimiser).
        Defaults 10·α, 1 and β; μ₁ must be positive (give it when α = 0).
    tol, max_iter : float, int
        Relative-change tolerance and iteration cap.
    progress : callable, optional
        ``progress(iteration, max_iter)``.

    Returns
    -------
    chi : ndarray, float32
        χ [ppm] on the whole grid, zero-mean and not masked: the mean is undetermined
        (D(0) = 0), so the caller masks and references it.
    n_iter : int
        Iterations run.

    Raises
    ------
    InvalidInputError
        A volume not 3-D, not finite or of another shape than ``laplacian_data``, a
        negative weight, a bad voxel size or B0 direction, or a bad parameter.
    """
    g = as_volume(laplacian_data, "laplacian_data")
    wl = as_weight(laplacian_weight, g.shape, "laplacian_weight")
    f = as_volume(local_field, "local_field")
    if f.shape != g.shape:
        raise InvalidInputError(f"local_field has shape {f.shape}, expected {g.shape}")
    wp = as_weight(local_weight, g.shape, "local_weight")
    vs = as_vec3(voxel_size, "voxel_size", positive=True)
    b0 = as_vec3(b0_dir, "b0_dir", positive=False)
    n, t = as_iterations(max_iter), as_tolerance(tol)
    try:
        a = _positive(alpha, "alpha", allow_zero=True)
        b = _positive(beta, "beta", allow_zero=True)
        m1 = _positive(SSTV_MU_GRADIENT_PER_ALPHA * a if mu1 is None else mu1,
                       "mu1 (default 10·alpha)")
        m2 = _positive(mu2, "mu2")
        m3 = _positive(b if mu3 is None else mu3, "mu3 (default beta)", allow_zero=b == 0)
    except ValueError as exc:
        raise InvalidInputError(f"sstv_admm: {exc}") from None
    chi, it = _core.sstv_admm(g, wl, f, wp, vs, b0, a, b, m1, m2, m3, t, n, progress)
    return chi, int(it)


def periodic_laplacian(x: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """The periodic 7-point Laplacian Σᵢ (x[+1] − 2x + x[−1]) / hᵢ² of a 3-D array
    [units of x per mm²], in float64 (the stencil of :func:`sstv_admm`'s L)."""
    arr = np.asarray(x, dtype=np.float64)
    vs = as_vec3(voxel_size, "voxel_size", positive=True)
    out = np.zeros_like(arr)
    for axis, h in enumerate(vs):
        out += (np.roll(arr, 1, axis) + np.roll(arr, -1, axis) - 2.0 * arr) / (h * h)
    return out


class _LaplacianData(NamedTuple):
    """:func:`_laplacian_data`'s result: g [ppm/mm²], W_L, and how many voxels of the
    eroded brain the outlier clipping dropped."""

    data: np.ndarray
    weight: np.ndarray
    outliers: int


def laplacian_data_term(total_field: np.ndarray, brain_mask: np.ndarray, *,
                        voxel_size: Sequence[float], erode_voxels: int = 2,
                        clip_sd: float | None = 5.0, grow_voxels: int = 1
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The Laplacian data term of :func:`sstv_admm`: g and its 0/1 weight W_L.

    g is the periodic 7-point Laplacian of the total field set to 0 outside the brain,
    kept on the brain eroded by ``erode_voxels`` (the stencil reaches outside the brain
    near its edge, where the zero fill makes g meaningless). Of those voxels, the ones
    whose |g − median| exceeds ``clip_sd`` robust SDs (1.4826·MAD over the kept voxels)
    — phase-unwrapping errors, vessels, air-tissue residues — and their neighbours within
    ``grow_voxels`` (6-connected dilation) are dropped.

    Parameters
    ----------
    total_field : ndarray, shape (X, Y, Z)
        Total (unwrapped, background included) field [ppm].
    brain_mask : ndarray, shape (X, Y, Z)
        Brain mask (non-zero = brain).
    voxel_size : sequence of 3 floats
        Voxel size [mm].
    erode_voxels : int
        Erosion of the brain mask [voxels] (0: none).
    clip_sd : float or None
        Outlier threshold in robust SDs (None: no clipping).
    grow_voxels : int
        Dilation of the outlier set [voxels] (0: none).

    Returns
    -------
    g : ndarray, float32
        Laplacian of the masked total field [ppm/mm²], 0 where the weight is 0.
    weight : ndarray, float32
        W_L, 1 on the kept voxels, 0 elsewhere.

    Raises
    ------
    InvalidInputError
        Bad arrays or voxel size, negative counts, a non-positive ``clip_sd``, or no voxel
        left after the erosion.
    """
    g, weight, _ = _laplacian_data(total_field, brain_mask, voxel_size=voxel_size,
                                   erode_voxels=erode_voxels, clip_sd=clip_sd,
                                   grow_voxels=grow_voxels)
    return g, weight


def _laplacian_data(total_field: np.ndarray, brain_mask: np.ndarray, *,
                    voxel_size: Sequence[float], erode_voxels: int,
                    clip_sd: float | None, grow_voxels: int) -> _LaplacianData:
    """:func:`laplacian_data_term`, with the count of clipped voxels."""
    field, brain, vs = as_field_inputs(total_field, brain_mask, voxel_size, "total_field")
    brain = brain.astype(bool)
    for name, count in (("erode_voxels", erode_voxels), ("grow_voxels", grow_voxels)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise InvalidInputError(f"{name} must be a whole number >= 0, got {count!r}")
    if clip_sd is not None and not (math.isfinite(clip_sd) and clip_sd > 0):
        raise InvalidInputError(f"clip_sd must be positive (or None), got {clip_sd!r}")
    # scipy's iterations=0 means "until nothing changes", hence the explicit guards.
    eroded = ndimage.binary_erosion(brain, iterations=erode_voxels) if erode_voxels else brain
    if not eroded.any():
        raise InvalidInputError(
            f"total_field: the brain mask is empty after {erode_voxels} voxels of erosion")
    lap = periodic_laplacian(np.where(brain, field, 0.0), vs)
    keep = eroded
    if clip_sd is not None:
        values = lap[eroded]
        med = np.median(values)
        sd = 1.4826 * np.median(np.abs(values - med))
        bad = eroded & (np.abs(lap - med) > clip_sd * sd)
        if grow_voxels:
            bad = ndimage.binary_dilation(bad, iterations=grow_voxels)
        keep = eroded & ~bad
    return _LaplacianData(np.where(keep, lap, 0.0).astype(np.float32),
                          keep.astype(np.float32), int((eroded & ~keep).sum()))


def medi(local_field: np.ndarray, mask: np.ndarray, magnitude: np.ndarray, *,
         voxel_size: Sequence[float], b0_dir: Sequence[float],
         phase_scale: float | None = None, alpha: float = 1e-4,
         edge_fraction: float = 0.3, mu_gradient: float = 0.1, mu_data: float = 1.0,
         max_iter: int = 200, tol: float = 1e-3,
         progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """MEDI-style magnitude-weighted L1: min Σ W²ρ(Dχ − f) + α‖G∘∇χ‖₁ by ADMM.

    W = :func:`magnitude_weight` (noise weighting), G = :func:`edge_weight` (no TV across
    the ``edge_fraction`` strongest magnitude edges); ρ nonlinear when ``phase_scale``
    [rad/ppm] is given (MEDI's complex-exponential fidelity), linear otherwise.
    MEDI's Gauss-Newton/CG solver is replaced by ADMM on the same objective.

    Returns
    -------
    chi : ndarray, float32
    n_iter : int
    """
    field = as_volume(local_field, "local_field")
    w = magnitude_weight(magnitude, mask)
    g = edge_weight(magnitude, mask, voxel_size=voxel_size, edge_fraction=edge_fraction)
    return tv_admm_weighted(field, mask, voxel_size=voxel_size, b0_dir=b0_dir, weight=w,
                            tv_weight=g, alpha=alpha, mu_gradient=mu_gradient,
                            mu_data=mu_data, max_iter=max_iter, tol=tol,
                            phase_scale=phase_scale, progress=progress)


def rts(local_field: np.ndarray, mask: np.ndarray, *, voxel_size: Sequence[float],
        b0_dir: Sequence[float], delta: float = 0.15, mu: float = 1e5, rho: float = 10.0,
        max_iter: int = 20, tol: float = 1e-2, lsqr_iter: int = 16,
        progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """Rapid two-step inversion (Kames et al. 2018).

    Step 1: x from ``lsqr_iter`` LSQR iterations (from 0) on the masked dipole model
    M·F⁻¹DF·x = M·f (Kames et al. use LSMR; same Krylov space), χ̂₀ = F{x} where
    |D| > ``delta``. Step 2: min μ/2‖M_wc(χ̂ − χ̂₀)‖² + ‖∇χ‖₁ by ADMM with penalty
    ``rho`` (threshold 1/ρ), so TV fills only the ill-conditioned cone.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_dir
        As in :func:`tikhonov`.
    delta : float
        Well-conditioned threshold on |D|, in (0, 2/3).
    mu, rho : float
        k-space data weight and ADMM penalty of step 2.
    max_iter, tol : int, float
        TV iterations of step 2 and their tolerance.
    lsqr_iter : int
        LSQR iterations of step 1 (a small fixed count).
    progress : callable, optional
        ``progress(iteration, lsqr_iter + max_iter)``.

    Returns
    -------
    chi : ndarray, float32
    n_iter : int
        TV iterations run.
    """
    field, m, vs, b0 = _inputs(local_field, mask, voxel_size, b0_dir)
    n, t = as_iterations(max_iter), as_tolerance(tol)
    if not 0 < float(delta) < 2.0 / 3.0:
        raise ValueError(f"delta must be in (0, 2/3), got {delta}")
    chi, it = _core.rts(field, m, vs, b0, float(delta), _positive(mu, "mu"),
                        _positive(rho, "rho"), n, t, as_iterations(lsqr_iter, "lsqr_iter"),
                        progress)
    return chi, int(it)


def ndi(local_field: np.ndarray, mask: np.ndarray, *, voxel_size: Sequence[float],
        b0_dir: Sequence[float], phase_scale: float, weight: np.ndarray | None = None,
        lam: float = 1e-3, step: float = 2.0, max_iter: int = 200, tol: float = 1e-3,
        progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """Nonlinear dipole inversion (Polak et al. 2020) by gradient descent.

    Minimises Σ W²(1 − cos(s·(Dχ − f)))/s² + λ/2‖χ‖² with s = ``phase_scale``
    [rad/ppm]; χ ← χ − τ·(Dᵀ(W² sin(s(Dχ − f))/s) + λχ). Early stopping regularises.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_dir
        As in :func:`tikhonov`.
    phase_scale : float
        Phase per ppm [rad/ppm], :func:`phase_per_ppm`.
    weight : ndarray, optional
        W (e.g. :func:`magnitude_weight`), 1 inside the mask by default.
    lam, step : float
        Tikhonov weight λ and gradient step τ.
    max_iter, tol : int, float
        Iteration cap; stop when ‖χₙ − χₙ₋₁‖/‖χₙ‖ < tol.

    Returns
    -------
    chi : ndarray, float32
        χ [ppm], 0 outside the mask (not referenced).
    n_iter : int
        Gradient-descent iterations run.
    """
    field, m, vs, b0 = _inputs(local_field, mask, voxel_size, b0_dir)
    n, t = as_iterations(max_iter), as_tolerance(tol)
    chi, it = _core.ndi(field, _weight(weight, field.shape, "weight"), m, vs, b0,
                        _positive(phase_scale, "phase_scale"),
                        _positive(lam, "lam", allow_zero=True), _positive(step, "step"), n, t,
                        progress)
    return chi, int(it)


# --------------------------------------------------------------------------- dispatcher

#: Parameters of :class:`InversionSettings` that each method uses (for the provenance).
_USES: dict[str, tuple[str, ...]] = {
    "tkd": ("tkd_threshold",),
    "tikhonov": ("tikhonov_lambda",),
    "ilsqr": ("ilsqr_tol", "ilsqr_max_iter", "ilsqr_streaking", "ilsqr_ill_threshold",
              "ilsqr_streak_tol", "ilsqr_streak_max_iter"),
    "tvadmm": ("tv_alpha", "tv_mu", "tv_max_iter", "tv_tol", "tv_weak_harmonic"),
    "tvmasked": ("masked_tv_alpha", "masked_tv_mu_gradient", "masked_tv_mu_data",
                 "masked_tv_max_iter", "masked_tv_tol"),
    "medi": ("medi_alpha", "medi_edge_fraction", "medi_mu_gradient", "medi_mu_data",
             "medi_max_iter", "medi_tol", "medi_nonlinear", "medi_alpha_rule",
             "medi_noise_factor"),
    "rts": ("rts_delta", "rts_mu", "rts_rho", "rts_max_iter", "rts_tol", "rts_lsqr_iter"),
    "ndi": ("ndi_lambda", "ndi_step", "ndi_max_iter", "ndi_tol"),
    "sstv": ("sstv_alpha", "sstv_beta", "sstv_erode_voxels", "sstv_clip_sd",
             "sstv_grow_voxels", "sstv_max_iter", "sstv_tol", "sstv_refine_iter",
             "sstv_refine_alpha", "sstv_alpha_rule", "sstv_noise_factor"),
}


def invert(method: str, local_field: np.ndarray, mask: np.ndarray, *,
           voxel_size: Sequence[float], b0_dir: Sequence[float],
           magnitude: np.ndarray | None = None, phase_scale: float | None = None,
           settings: InversionSettings | None = None,
           progress: Callable[[int, int], None] | None = None,
           field_sd: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the dipole inversion ``method`` (a key of :data:`INVERSION_METHODS`).

    Parameters
    ----------
    method : str
    local_field, mask, voxel_size, b0_dir
        As in :func:`tikhonov`.
    magnitude : ndarray, optional
        Magnitude on the same grid; used for the data weights of iLSQR, MEDI, NDI and the
        weak-harmonic TV (uniform weights without it) and MEDI's edge mask (required).
    phase_scale : float, optional
        Phase per ppm [rad/ppm] (:func:`phase_per_ppm` of B0 and an echo time); needed by
        NDI and nonlinear MEDI.
    settings : InversionSettings, optional
    progress : callable, optional
        ``progress(iteration, max_iter)`` for the iterative methods.
    field_sd : ndarray, optional
        Field noise σ_f [ppm] on the same grid (the field fit's standard deviation); MEDI
        scales α with it (``medi_alpha_rule="noise"``, :func:`noise_scaled_alpha`).

    Returns
    -------
    chi : ndarray, float32
        χ [ppm], 0 outside the mask, not referenced.
    record : dict
        Provenance: method, reference, every parameter used, iterations run, weighting.
    """
    if method not in INVERSION_METHODS:
        raise ValueError(f"unknown dipole inversion {method!r} "
                         f"(choose one of {', '.join(INVERSION_METHODS)})")
    if method in SINGLE_STEP_METHODS:
        raise ValueError(f"{method!r} is a single-step inversion of the total field; run it "
                         "with invert_single_step (the QSM chain does)")
    s = settings or InversionSettings()
    geo = {"voxel_size": voxel_size, "b0_dir": b0_dir}
    weight = None if magnitude is None else magnitude_weight(magnitude, mask)
    weighting = "magnitude / its 99th percentile in the mask, clipped to 1"
    record: dict[str, Any] = {"Method": INVERSION_METHODS[method],
                              "Reference": _REFERENCES[method]}
    record["Parameters"] = {k: v for k, v in asdict(s).items() if k in _USES[method]}
    n_iter: int | None = None
    if method == "tkd":
        chi = tkd(local_field, mask, threshold=s.tkd_threshold, **geo)
    elif method == "tikhonov":
        chi = tikhonov(local_field, mask, lam=s.tikhonov_lambda, **geo)
    elif method == "ilsqr":
        chi, n_lsqr, n_streak = _ilsqr_run(
            local_field, mask, weight=weight, tol=s.ilsqr_tol, max_iter=s.ilsqr_max_iter,
            streaking=s.ilsqr_streaking, ill_threshold=s.ilsqr_ill_threshold,
            streak_tol=s.ilsqr_streak_tol, streak_max_iter=s.ilsqr_streak_max_iter,
            progress=progress, **geo)
        n_iter = n_lsqr + n_streak
        record["DataWeight"] = weighting if weight is not None else "mask"
        if s.ilsqr_streaking:
            record["Steps"] = ("1 LSQR on the weighted dipole model; 2 fast QSM (sgn(D), "
                               "3 mm spherical mean where |D| is small, scaled to TKD 1/8); "
                               "3 streaking artefact by LSQR on the ill-conditioned cone "
                               "with gradient weights from step 2 (50th/70th percentiles); "
                               "4 subtraction")
            record["IterationsLSQR"] = n_lsqr
            record["IterationsStreaking"] = n_streak
        else:
            record["Method"] = "iLSQR (LSQR core only)"
    elif method == "tvadmm" and not s.tv_weak_harmonic:
        chi, n_iter = tv_admm(local_field, mask, alpha=s.tv_alpha, mu=s.tv_mu,
                                  max_iter=s.tv_max_iter, tol=s.tv_tol, progress=progress,
                                  **geo)
    elif method == "tvadmm":
        chi, n_iter = tv_admm_weighted(local_field, mask, weight=weight, alpha=s.wh_alpha,
                                       mu_gradient=s.tv_mu, max_iter=s.tv_max_iter,
                                       tol=s.tv_tol, weak_harmonic=(s.wh_beta, s.wh_mu),
                                       progress=progress, **geo)
        record["Method"] = "TV-ADMM with weak-harmonic background term (FANSI-style)"
        del record["Parameters"]["tv_alpha"]
        record["Parameters"].update({"wh_alpha": s.wh_alpha, "wh_beta": s.wh_beta,
                                     "wh_mu": s.wh_mu, "mu_data": 1.0})
        record["DataWeight"] = weighting if weight is not None else "mask"
    elif method == "tvmasked":
        chi, n_iter = tv_admm_masked(local_field, mask, alpha=s.masked_tv_alpha,
                                     mu_gradient=s.masked_tv_mu_gradient,
                                     mu_data=s.masked_tv_mu_data,
                                     max_iter=s.masked_tv_max_iter, tol=s.masked_tv_tol,
                                     progress=progress, **geo)
        record["DataWeight"] = "mask (1 inside, 0 outside; no magnitude weighting)"
    elif method == "medi":
        if magnitude is None:
            raise ValueError("MEDI needs the magnitude (edge mask and noise weighting)")
        scale = phase_scale if s.medi_nonlinear else None
        if s.medi_nonlinear and phase_scale is None:
            raise ValueError("nonlinear MEDI needs phase_scale (rad/ppm); give it or set "
                             "medi_nonlinear=False")
        if s.medi_alpha_rule not in ("noise", "fixed"):
            raise ValueError(f"medi_alpha_rule must be 'noise' or 'fixed', got "
                             f"{s.medi_alpha_rule!r}")
        alpha = s.medi_alpha
        if s.medi_alpha_rule == "noise" and field_sd is not None:
            alpha, sigma_w = noise_scaled_alpha(field_sd, weight, mask,
                                                base_alpha=s.medi_alpha,
                                                factor=s.medi_noise_factor)
            record["AlphaRule"] = ("max(medi_alpha, medi_noise_factor x median over the "
                                   "mask of W x field SD)")
            record["WeightedNoiseSD_ppm"] = sigma_w
        else:
            record["AlphaRule"] = ("medi_alpha (no field-noise map given)"
                                   if s.medi_alpha_rule == "noise" else "medi_alpha")
        record["AlphaUsed"] = alpha
        chi, n_iter = medi(local_field, mask, magnitude, phase_scale=scale,
                           alpha=alpha, edge_fraction=s.medi_edge_fraction,
                           mu_gradient=s.medi_mu_gradient, mu_data=s.medi_mu_data,
                           max_iter=s.medi_max_iter, tol=s.medi_tol, progress=progress,
                           **geo)
        record["DataWeight"] = weighting
        record["Solver"] = "ADMM (instead of MEDI's Gauss-Newton/CG) on the same objective"
        if scale is not None:
            record["PhasePerPpm_rad"] = scale
    elif method == "rts":
        chi, n_iter = rts(local_field, mask, delta=s.rts_delta, mu=s.rts_mu, rho=s.rts_rho,
                          max_iter=s.rts_max_iter, tol=s.rts_tol, lsqr_iter=s.rts_lsqr_iter,
                          progress=progress, **geo)
        record["Step1"] = (f"{s.rts_lsqr_iter} LSQR iterations on the masked dipole model "
                           "(LSMR in Kames et al.), kept where |D| > delta")
    else:  # ndi
        if phase_scale is None:
            raise ValueError("NDI needs phase_scale (rad/ppm), e.g. phase_per_ppm(B0, TE)")
        chi, n_iter = ndi(local_field, mask, weight=weight, phase_scale=phase_scale,
                          lam=s.ndi_lambda, step=s.ndi_step, max_iter=s.ndi_max_iter,
                          tol=s.ndi_tol, progress=progress, **geo)
        record["DataWeight"] = weighting if weight is not None else "mask"
        record["PhasePerPpm_rad"] = phase_scale
    if n_iter is not None:
        record["IterationsRun"] = int(n_iter)
        logger.debug("%s stopped after %d iterations", method, n_iter)
    return chi, record


def invert_single_step(method: str, total_field: np.ndarray, brain_mask: np.ndarray,
                       local_field: np.ndarray, local_mask: np.ndarray, *,
                       voxel_size: Sequence[float], b0_dir: Sequence[float],
                       settings: InversionSettings | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       field_sd: np.ndarray | None = None
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the single-step inversion ``method`` (a key of :data:`SINGLE_STEP_METHODS`).

    "sstv" minimises ½‖M_L(Δf − ΔDχ)‖² + β/2‖M_P(f_local − Dχ)‖² + α‖∇χ‖₁ over the
    whole brain (:func:`sstv_admm`). The Laplacian term holds every source inside the
    brain, however close to its edge, and none outside (the Laplacian of a background
    field is 0 inside the brain); it constrains the low spatial frequencies weakly, which
    the local field of a background removal (LBV) pins where that field is valid. M_L is
    the brain eroded by ``sstv_erode_voxels`` less the Laplacian outliers
    (:func:`laplacian_data_term`).

    Parameters
    ----------
    method : str
    total_field : ndarray, shape (X, Y, Z)
        Total field [ppm] (finite inside ``brain_mask``).
    brain_mask : ndarray of bool
        Where χ is estimated (the phase-quality brain mask).
    local_field : ndarray
        Local field [ppm] of the background removal, valid in ``local_mask``.
    local_mask : ndarray of bool
    voxel_size, b0_dir
        As in :func:`tikhonov`.
    settings : InversionSettings, optional
    progress : callable, optional
        ``progress(iteration, max_iter)``.
    field_sd : ndarray, optional
        Field noise σ_f [ppm] (the field fit's Cramér–Rao map): with
        ``sstv_alpha_rule="noise"``, α = max(``sstv_alpha``, ``sstv_noise_factor``·σ_L),
        σ_L the median of :func:`laplacian_noise_map` over the Laplacian data (the same
        max-rule as MEDI's, :func:`noise_scaled_alpha`). TV wants α ∝ noise; the
        Laplacian's noise grows as 1/h² and with the field noise, and a fixed α that suits
        2 mm at SNR 100 leaves noise texture at 0.5 mm in-plane or SNR 15.

    Returns
    -------
    chi : ndarray, float32
        χ [ppm], 0 outside ``brain_mask``, not referenced.
    record : dict
        Provenance: method, reference, parameters, data-term voxels, iterations run.
    """
    if method not in SINGLE_STEP_METHODS:
        raise ValueError(f"unknown single-step inversion {method!r} "
                         f"(choose one of {', '.join(SINGLE_STEP_METHODS)})")
    s = settings or InversionSettings()
    brain = np.asarray(brain_mask, dtype=bool)
    anchor = np.asarray(local_mask, dtype=bool) & brain
    if not brain.any():
        raise ValueError("brain mask is empty")
    total = np.where(brain, np.nan_to_num(np.asarray(total_field, dtype=np.float64)), 0.0)
    total = np.where(brain, total - total[brain].mean(), 0.0)
    local = np.nan_to_num(np.asarray(local_field, dtype=np.float64))
    # D(0) = 0: a constant in the local field cannot be fitted; centring it helps ADMM.
    local = np.where(anchor, local - (local[anchor].mean() if anchor.any() else 0.0), 0.0)
    lap_data, lap_weight, n_outliers = _laplacian_data(
        total, brain, voxel_size=voxel_size, erode_voxels=s.sstv_erode_voxels,
        clip_sd=s.sstv_clip_sd, grow_voxels=s.sstv_grow_voxels)
    lap_mask = lap_weight > 0
    alpha, rule = s.sstv_alpha, {"AlphaRule": "sstv_alpha"}
    if s.sstv_alpha_rule == "noise":
        if field_sd is None:
            rule = {"AlphaRule": "sstv_alpha (no field-noise map given)"}
        else:
            # MEDI's rule on the Laplacian data's own noise (weight 1).
            alpha, sigma_l = noise_scaled_alpha(
                laplacian_noise_map(field_sd, voxel_size), np.float64(1.0), lap_mask,
                base_alpha=s.sstv_alpha, factor=s.sstv_noise_factor)
            rule = {"AlphaRule": "max(sstv_alpha, sstv_noise_factor x median noise SD of "
                                 "the Laplacian data)",
                    "LaplacianNoiseSD_ppm_per_mm2": sigma_l}
    chi, n_iter = sstv_admm(lap_data, lap_weight, local, anchor.astype(np.float32),
                            voxel_size=voxel_size, b0_dir=b0_dir, alpha=alpha,
                            beta=s.sstv_beta, tol=s.sstv_tol, max_iter=s.sstv_max_iter,
                            progress=progress)
    chi = np.where(brain, chi, 0.0).astype(np.float32)
    record: dict[str, Any] = {
        "Method": INVERSION_METHODS[method], "Reference": _REFERENCES[method],
        "Parameters": {k: v for k, v in asdict(s).items() if k in _USES[method]},
        **rule, "AlphaUsed": alpha,
        "ADMMPenalties": {"gradient": SSTV_MU_GRADIENT_PER_ALPHA * alpha,
                          "laplacian": SSTV_MU_LAPLACIAN, "local_field": s.sstv_beta},
        "LaplacianDataVoxels": int(lap_mask.sum()),
        "LaplacianOutlierVoxels": n_outliers,
        "LocalFieldVoxels": int(anchor.sum()),
        "IterationsRun": int(n_iter)}
    return chi, record

"""The QSM chain's settings: one typed section per step, and the sidecar's flat ``Parameters``.

:class:`QsmParameters` holds five sections — :class:`MaskSettings` (brain mask),
:class:`FieldSettings` (unwrapping, echo fit, phase-quality mask),
:class:`BackgroundSettings` (erosion and background-field removal),
:class:`~alsiron.qsm.inversion.InversionSettings` (dipole inversion) and
:class:`R2starSettings` — each with its defaults (the tuned values) and its own checks.
Every section is frozen: its values are checked once, on construction, and the object
that ran is the object recorded; variants are made with :func:`dataclasses.replace`
(which checks again).

The sidecar records the settings as one flat dictionary (:meth:`QsmParameters.to_flat`,
keys in :data:`PARAMETER_KEYS`), the same keys, values and order as before the sections
existed, so sidecars of older runs compare key by key; :meth:`QsmParameters.from_flat`
reads it back (a sidecar written before a key existed reads as what ran then,
:data:`ADDED_LATER`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from alsiron.errors import InvalidInputError
from alsiron.field import brain_mask as bm
from alsiron.field import echo_fit as fieldmap
from alsiron.qsm import bfr
from alsiron.qsm.inversion import InversionSettings

__all__ = [
    "BFR_ERODE_MM",
    "BFR_METHODS",
    "PARAMETER_KEYS",
    "BackgroundSettings",
    "FieldSettings",
    "InversionSettings",
    "MaskSettings",
    "QsmParameters",
    "R2starSettings",
]

#: Background-field removal methods (:attr:`BackgroundSettings.method`) → provenance name.
BFR_METHODS: dict[str, str] = {"vsharp": "V-SHARP", "pdf": "PDF", "ismv": "iSMV",
                                "lbv": "LBV"}

#: Where PDF's background sources may sit (:attr:`BackgroundSettings.pdf_sources`).
PDF_SOURCE_REGIONS: dict[str, str] = {
    "outside_mask": "every voxel outside the eroded mask",
    "outside_brain": "only outside the phase-quality brain mask (none in the eroded rim)"}

#: PDF's settings when unset (None), before a two-step (False) or a single-step (True)
#: inversion. Two-step: CG's relative tolerance stops it after a few iterations, which
#: regularises it (docs/qsm_bfr.md). Single-step anchor: smooth sources kept outside the
#: brain and a fixed 25 iterations (the tolerance never stops it first), measured on the
#: anatomical phantom (docs/qsm_anatomy.md, "The refined anchor").
PDF_DEFAULTS: dict[bool, dict[str, Any]] = {
    False: {"pdf_tol": bfr.PDF_TOL, "pdf_max_iter": bfr.PDF_MAX_ITER,
            "pdf_source_smoothing": 0.0, "pdf_sources": "outside_mask"},
    True: {"pdf_tol": 1e-6, "pdf_max_iter": 25, "pdf_source_smoothing": 3e-4,
           "pdf_sources": "outside_brain"},
}

#: Default depth [mm] eroded from the phase-quality brain mask before each background-
#: field removal (:attr:`BackgroundSettings.erode_mm` = None). PDF: 4 mm, measured with
#: ``bench/erosion_study.py`` (docs/qsm_mask_erosion.md). The SMV-based methods and LBV
#: keep the former depth at 3 mm (2 voxels = 6 mm): they lose the cortex to their own
#: erosion anyway, and with 4 mm the outer layer's unreliable field leaks into their
#: spheres (64³/3 mm, χ NRMSE on a common mask: V-SHARP 52.3 % vs 41.4 %, iSMV 38.4 vs
#: 37.8 %, LBV 85.0 vs 81.8 %).
BFR_ERODE_MM: dict[str, float] = {"pdf": 4.0, "vsharp": 6.0, "ismv": 6.0, "lbv": 6.0}


def _check_choice(value: str, choices: Mapping[str, str], what: str) -> None:
    if value not in choices:
        raise InvalidInputError(f"unknown {what} {value!r} (choose one of {', '.join(choices)})")


@dataclass(frozen=True)
class MaskSettings:
    """Brain mask from the echo-1 magnitude.

    Attributes
    ----------
    method : {"bet", "otsu"}
        :data:`alsiron.field.brain_mask.BRAIN_MASK_METHODS`: "bet" = deformable surface
        model (Smith 2002; docs/brain_mask.md), "otsu" = threshold + opening + largest
        component. Checked on construction, also when a user mask replaces it.
    bet_f : float
        BET fractional intensity threshold in (0, 1); smaller values give a larger mask.
    opening_voxels : int
        With "otsu": radius (voxels) of the erosion that separates brain from scalp
        before the largest connected component is kept (dilated back afterwards).
    """

    method: str = bm.DEFAULT_BRAIN_MASK_METHOD
    bet_f: float = 0.5
    opening_voxels: int = 2

    def __post_init__(self) -> None:
        _check_choice(self.method, bm.BRAIN_MASK_METHODS, "brain-mask method")


@dataclass(frozen=True)
class FieldSettings:
    """Phase unwrapping, the multi-echo field fit and the phase-quality mask.

    Attributes
    ----------
    unwrapping : {"romeo", "laplacian", "echodiff"}
        Spatial phase unwrapping (see
        :data:`alsiron.field.echo_fit.UNWRAPPING_METHODS`): "romeo" = MCPC-3D-S
        offset removal, ROMEO-weighted region growing of echo 1 and temporal unwrapping;
        "laplacian" = the same with FFT Laplacian unwrapping of echo 1; "echodiff" =
        region growing of the closest echo pair's phase difference (the first chain's).
    complex_fit : bool
        Refine the field by the nonlinear magnitude-weighted complex fit over echoes
        (otherwise the magnitude²-weighted linear fit of the unwrapped phase).
    phase_offset : {"smoothed", "fitted", "fixed"}
        How the fit treats the phase offset φ0 (see
        :data:`alsiron.field.echo_fit.PHASE_OFFSET_METHODS`). Default "smoothed": φ0
        fitted per voxel, smoothed by a local-linear Gaussian fit and held fixed, so the
        field's error does not depend on φ0; "fixed" = the former default (φ0 held at
        the MCPC-3D-S estimate), whose error grows with φ0's gradient at the mask edge
        (field NRMSE 14.7 % vs 1.0 % on qsm-forward's phantom; table in docs/field.md).
    residual_threshold : float
        Voxels whose magnitude-weighted RMS phase residual of the field fit exceeds this
        [rad] are excluded from the QSM mask (phase-quality masking).
    """

    unwrapping: str = "romeo"
    complex_fit: bool = True
    residual_threshold: float = 0.5
    phase_offset: str = fieldmap.DEFAULT_PHASE_OFFSET

    def __post_init__(self) -> None:
        _check_choice(self.unwrapping, fieldmap.UNWRAPPING_METHODS, "phase unwrapping")
        _check_choice(self.phase_offset, fieldmap.PHASE_OFFSET_METHODS, "phase offset")


@dataclass(frozen=True)
class BackgroundSettings:
    """Erosion of the phase-quality mask and background-field removal.

    Attributes
    ----------
    method : {"pdf", "vsharp", "ismv", "lbv"}
        Background-field removal (see :data:`BFR_METHODS`). Default "pdf": on the head
        phantom (pipeline field fit and masks, the former 2-voxel erosion, TV-ADMM;
        measured with ``bench/bfr_accuracy.py``) it is the only method that keeps the
        cortical contrast, and it is as accurate as V-SHARP or better on the same voxels
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
    erode_mm : float or None
        Depth [mm] eroded from the phase-quality brain mask before background-field
        removal (:func:`alsiron.qsm.bfr.erode_mm`: voxels whose centre lies within this
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
    erode_voxels : int or None
        Legacy erosion (the chain before the mm criterion): this many 6-connected
        one-voxel erosions, used instead of ``erode_mm`` when not None; >= 0.
    trim_sd_factor : float or None
        Reliability trim after the erosion (off by default): voxels within
        ``trim_band_mm`` of the edge whose field SD exceeds this factor × the median
        field SD are dropped too (> 0). Measured worse than the plain 4 mm erosion on
        the phantom (docs/qsm_mask_erosion.md): the edge error there is systematic
        (partial volume with bone), not noise, so the field SD does not single it out.
    trim_band_mm : float
        Width [mm] of the edge band the reliability trim looks at (>= 0).
    vsharp_radii_mm : tuple of float or None
        V-SHARP sphere radii in mm; None = :func:`alsiron.qsm.chain.default_vsharp_radii`
        (24 mm down to one voxel). Radii beyond the consensus' 12 mm keep more of the
        slowly varying local field: on the head phantom they lowered χ NRMSE from 110 %
        to 75 % (64³, 3 mm) and raised the deep-grey slope from 0.79 to 0.86.
    vsharp_threshold : float
        Truncation of the V-SHARP deconvolution kernel.
    pdf_tol, pdf_max_iter, pdf_pad_voxels : float or None, int or None, int
        PDF's CG tolerance, iteration cap and zero padding (voxels per axis). None: the
        value of :data:`PDF_DEFAULTS` for the inversion that follows (two-step: 3e-3 and
        100, so that CG's early stop regularises; single-step anchor: a fixed 25
        iterations).
    pdf_source_smoothing : float or None
        Weight λ [mm²] of PDF's squared-gradient penalty on its background sources
        (:func:`alsiron.qsm.bfr.pdf`); 0 = plain PDF. None: :data:`PDF_DEFAULTS` (0 before
        a two-step inversion, 3e-4 before a single-step one).
    pdf_sources : {"outside_mask", "outside_brain"} or None
        Where PDF's background sources may sit: anywhere outside the eroded mask it fits
        (plain PDF), or only outside the phase-quality brain mask, so that the rim between
        the brain's edge and the eroded mask holds neither data nor sources (for the anchor
        of a single-step inversion, which estimates χ in that rim itself). None:
        :data:`PDF_DEFAULTS` ("outside_mask" two-step, "outside_brain" single-step).
    ismv_radius_mm : float or None
        iSMV sphere radius in mm; None = two (largest) voxel edges (Wen et al. 2014).
    ismv_tol, ismv_max_iter : float, int
        iSMV stopping tolerance and iteration cap.
    lbv_tol, lbv_max_iter : float, int
        LBV's CG tolerance and iteration cap.
    """

    method: str = "pdf"
    erode_mm: float | None = None
    erode_voxels: int | None = None
    trim_sd_factor: float | None = None
    trim_band_mm: float = 6.0
    vsharp_radii_mm: tuple[float, ...] | None = None
    vsharp_threshold: float = bfr.VSHARP_THRESHOLD
    pdf_tol: float | None = None
    pdf_max_iter: int | None = None
    pdf_pad_voxels: int = bfr.PDF_PAD_VOXELS
    pdf_source_smoothing: float | None = None
    pdf_sources: str | None = None
    ismv_radius_mm: float | None = None
    ismv_tol: float = bfr.ISMV_TOL
    ismv_max_iter: int = bfr.ISMV_MAX_ITER
    lbv_tol: float = bfr.LBV_TOL
    lbv_max_iter: int = bfr.LBV_MAX_ITER

    def __post_init__(self) -> None:
        _check_choice(self.method, BFR_METHODS, "background-field removal")
        if self.erode_voxels is not None and self.erode_voxels < 0:
            raise InvalidInputError(f"bfr_erode_voxels must be >= 0, got {self.erode_voxels}")
        if self.trim_sd_factor is not None and not (self.trim_sd_factor > 0
                                                    and self.trim_band_mm >= 0):
            raise InvalidInputError("bfr_trim_sd_factor must be > 0 and bfr_trim_band_mm >= 0, got "
                                    f"{self.trim_sd_factor} and {self.trim_band_mm}")
        if self.pdf_source_smoothing is not None and not (
                math.isfinite(self.pdf_source_smoothing) and self.pdf_source_smoothing >= 0):
            raise InvalidInputError("pdf_source_smoothing must be a finite value >= 0 [mm²], "
                                    f"got {self.pdf_source_smoothing}")
        if self.pdf_sources is not None:
            _check_choice(self.pdf_sources, PDF_SOURCE_REGIONS, "PDF source region")

    def resolved(self, single_step: bool) -> BackgroundSettings:
        """These settings with every unset (None) PDF setting replaced by its value in
        :data:`PDF_DEFAULTS` for a single-step (True) or two-step (False) inversion."""
        defaults = PDF_DEFAULTS[single_step]
        return replace(self, **{k: v for k, v in defaults.items()
                                if getattr(self, k) is None})


@dataclass(frozen=True)
class R2starSettings:
    """The R2* fit of the chain.

    Attributes
    ----------
    weighted : bool
        Use the S²-weighted log-linear R2* fit.
    """

    weighted: bool = True


@dataclass(frozen=True)
class QsmParameters:
    """Algorithm choices and parameters of the QSM + R2* chain, one section per step
    (defaults are the tuned values; see each section).

    Attributes
    ----------
    mask : MaskSettings
    field : FieldSettings
    background : BackgroundSettings
    inversion : InversionSettings
        :class:`alsiron.qsm.inversion.InversionSettings`; its ``method`` is the inversion
        the chain runs.
    r2star : R2starSettings

    There is no reference section: the chain references χ to the whole-brain mean or to
    a region given as an array (:func:`alsiron.qsm.chain.process_series`), which has no
    parameter.
    """

    mask: MaskSettings = dataclasses.field(default_factory=MaskSettings)
    field: FieldSettings = dataclasses.field(default_factory=FieldSettings)
    background: BackgroundSettings = dataclasses.field(default_factory=BackgroundSettings)
    inversion: InversionSettings = dataclasses.field(default_factory=InversionSettings)
    r2star: R2starSettings = dataclasses.field(default_factory=R2starSettings)

    def to_flat(self) -> dict[str, Any]:
        """The flat dictionary of the sidecar's ``Parameters``: every value under its
        flat key, in the order of :data:`PARAMETER_KEYS`."""
        return {key: getattr(getattr(self, section), name)
                for key, (section, name) in _FLAT_INDEX.items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> QsmParameters:
        """Parameters from flat keys (a sidecar's ``Parameters``, or some of them: the
        others keep their defaults).

        Raises
        ------
        ValueError
            A key that is no parameter, or a value a section refuses.
        """
        unknown = [k for k in flat if k not in _FLAT_INDEX]
        if unknown:
            raise ValueError(f"unknown QSM parameter(s) {', '.join(map(repr, unknown))}")
        if _is_whole_sidecar(flat):
            flat = {**{k: v for k, v in ADDED_LATER.items() if k not in flat}, **flat}
        changes: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section, name = _FLAT_INDEX[key]
            changes.setdefault(section, {})[name] = value
        default = cls()
        return cls(**{section: replace(getattr(default, section), **values)
                      for section, values in changes.items()})


#: Section fields whose flat key is not the field's own name (the flat names predate
#: the sections and stay, so that sidecars compare across versions).
_RENAMED: dict[tuple[str, str], str] = {
    ("mask", "method"): "brain_mask_method",
    ("mask", "opening_voxels"): "mask_opening_voxels",
    ("background", "method"): "bfr",
    ("background", "erode_mm"): "bfr_erode_mm",
    ("background", "erode_voxels"): "bfr_erode_voxels",
    ("background", "trim_sd_factor"): "bfr_trim_sd_factor",
    ("background", "trim_band_mm"): "bfr_trim_band_mm",
    ("inversion", "method"): "inversion",
    ("r2star", "weighted"): "r2star_weighted",
}

#: Keys of the sidecar's ``Parameters`` in their order (that of the flat parameter
#: class the sections replaced).
PARAMETER_KEYS: tuple[str, ...] = (
    "brain_mask_method", "bet_f", "mask_opening_voxels", "residual_threshold",
    "bfr_erode_mm", "bfr_erode_voxels", "bfr_trim_sd_factor", "bfr_trim_band_mm",
    "vsharp_radii_mm", "vsharp_threshold", "bfr", "pdf_tol", "pdf_max_iter",
    "pdf_pad_voxels", "ismv_radius_mm", "ismv_tol", "ismv_max_iter", "lbv_tol",
    "lbv_max_iter", "inversion", "tkd_threshold", "tv_alpha", "tv_mu", "tv_max_iter",
    "tv_tol", "tikhonov_lambda", "ilsqr_tol", "ilsqr_max_iter", "ilsqr_streaking",
    "ilsqr_ill_threshold", "ilsqr_streak_tol", "ilsqr_streak_max_iter", "tv_weak_harmonic",
    "wh_alpha", "wh_beta", "wh_mu", "masked_tv_alpha", "masked_tv_mu_gradient",
    "masked_tv_mu_data", "masked_tv_max_iter", "masked_tv_tol", "medi_alpha",
    "medi_edge_fraction", "medi_mu_gradient", "medi_mu_data", "medi_max_iter", "medi_tol",
    "medi_nonlinear", "medi_alpha_rule", "medi_noise_factor", "rts_delta", "rts_mu",
    "rts_rho", "rts_max_iter", "rts_tol", "rts_lsqr_iter", "ndi_lambda", "ndi_step",
    "ndi_max_iter", "ndi_tol", "r2star_weighted", "unwrapping", "complex_fit",
    "phase_offset", "sstv_alpha", "sstv_beta", "sstv_erode_voxels", "sstv_clip_sd",
    "sstv_grow_voxels", "sstv_max_iter", "sstv_tol", "pdf_source_smoothing", "pdf_sources",
    "sstv_refine_iter", "sstv_refine_alpha", "sstv_alpha_rule", "sstv_noise_factor",
)

#: Keys added after sidecars were first written, with the value every run before them
#: used. A sidecar that lacks one of them was written before it existed, so
#: :meth:`QsmParameters.from_flat` reads it as that value, not as today's default.
#: ``phase_offset``: the MCPC-3D-S offset held fixed was the only method before the key.
#: The PDF source options and the refined single-step anchor did not exist before their
#: keys: plain PDF, sources anywhere outside the mask, the anchor as the BFR gave it.
#: The first pass's own α came later still: before it, the first pass ran the final
#: pass's α (None). The final pass's α was fixed before its noise rule.
ADDED_LATER: dict[str, Any] = {"phase_offset": "fixed", "pdf_source_smoothing": 0.0,
                               "pdf_sources": "outside_mask", "sstv_refine_iter": 0,
                               "sstv_refine_alpha": None, "sstv_alpha_rule": "fixed"}


def _flat_index() -> dict[str, tuple[str, str]]:
    """Flat key → (section, field name), in :data:`PARAMETER_KEYS` order; refuses a
    section field without a key (it would be missing from every sidecar)."""
    index: dict[str, tuple[str, str]] = {}
    for section in fields(QsmParameters):
        for f in fields(section.default_factory()):  # type: ignore[misc]
            key = _RENAMED.get((section.name, f.name), f.name)
            if key in index:
                raise RuntimeError(f"two QSM parameters share the flat key {key!r}")
            index[key] = (section.name, f.name)
    if set(index) != set(PARAMETER_KEYS):
        raise RuntimeError("PARAMETER_KEYS and the sections' fields differ: "
                           f"{sorted(set(index) ^ set(PARAMETER_KEYS))}")
    return {key: index[key] for key in PARAMETER_KEYS}


_FLAT_INDEX: dict[str, tuple[str, str]] = _flat_index()


def _is_whole_sidecar(flat: Mapping[str, Any]) -> bool:
    """``flat`` is a sidecar's whole ``Parameters`` (every key that predates
    :data:`ADDED_LATER`), not a few chosen keys."""
    return all(k in flat for k in PARAMETER_KEYS[:PARAMETER_KEYS.index("phase_offset")])

"""The QSM settings model: sections with today's defaults, and the sidecar's flat
``Parameters`` (same keys, values, types and order as the sidecars written before the
sections existed)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from alsiron.qsm.settings import (
    PARAMETER_KEYS,
    BackgroundSettings,
    FieldSettings,
    InversionSettings,
    MaskSettings,
    QsmParameters,
    R2starSettings,
)

#: ``Parameters`` of a default run's Chimap sidecar, written by the flat QsmParameters
#: (commit 9d6faf6, ``alsiron qsm`` on the output-manifest phantom), plus the field
#: fit's ``phase_offset`` (issue 13).
SIDECAR_PARAMETERS = {
    "brain_mask_method": "bet", "bet_f": 0.5, "mask_opening_voxels": 2,
    "residual_threshold": 0.5, "bfr_erode_mm": None, "bfr_erode_voxels": None,
    "bfr_trim_sd_factor": None, "bfr_trim_band_mm": 6.0, "vsharp_radii_mm": None,
    "vsharp_threshold": 0.05, "bfr": "pdf", "pdf_tol": None, "pdf_max_iter": None,
    "pdf_pad_voxels": 16, "ismv_radius_mm": None, "ismv_tol": 0.001, "ismv_max_iter": 500,
    "lbv_tol": 0.0001, "lbv_max_iter": 2000, "inversion": "sstv", "tkd_threshold": 0.19,
    "tv_alpha": 0.0007, "tv_mu": 0.07, "tv_max_iter": 200, "tv_tol": 0.001,
    "tikhonov_lambda": 0.02, "ilsqr_tol": 0.01, "ilsqr_max_iter": 50, "ilsqr_streaking": True,
    "ilsqr_ill_threshold": 0.1, "ilsqr_streak_tol": 0.01, "ilsqr_streak_max_iter": 50,
    "tv_weak_harmonic": False, "wh_alpha": 0.0001, "wh_beta": 1000.0, "wh_mu": 1.0,
    "masked_tv_alpha": 0.0007, "masked_tv_mu_gradient": 0.14, "masked_tv_mu_data": 0.1,
    "masked_tv_max_iter": 200, "masked_tv_tol": 0.02, "medi_alpha": 0.0001,
    "medi_edge_fraction": 0.3, "medi_mu_gradient": 0.1, "medi_mu_data": 1.0,
    "medi_max_iter": 200, "medi_tol": 0.001, "medi_nonlinear": True,
    "medi_alpha_rule": "noise", "medi_noise_factor": 0.3, "rts_delta": 0.15,
    "rts_mu": 100000.0, "rts_rho": 10.0, "rts_max_iter": 20, "rts_tol": 0.01,
    "rts_lsqr_iter": 16, "ndi_lambda": 0.001, "ndi_step": 2.0, "ndi_max_iter": 200,
    "ndi_tol": 0.001, "r2star_weighted": True, "unwrapping": "romeo", "complex_fit": True,
    "phase_offset": "smoothed", "sstv_alpha": 2e-05, "sstv_beta": 1.0,
    "sstv_erode_voxels": 2, "sstv_clip_sd": 10.0, "sstv_grow_voxels": 1,
    "sstv_max_iter": 80, "sstv_tol": 0.001, "pdf_source_smoothing": None,
    "pdf_sources": None, "sstv_refine_iter": 80, "sstv_refine_alpha": 0.0007,
    "sstv_alpha_rule": "noise", "sstv_noise_factor": 0.008,
}


def _varied() -> QsmParameters:
    """Parameters that differ from the defaults in every section."""
    return QsmParameters(
        mask=MaskSettings(method="otsu", bet_f=0.3, opening_voxels=3),
        field=FieldSettings(unwrapping="laplacian", complex_fit=False, residual_threshold=0.7,
                            phase_offset="fixed"),
        background=BackgroundSettings(method="vsharp", erode_voxels=2, trim_sd_factor=3.0,
                                      vsharp_radii_mm=(12.0, 6.0, 3.0), lbv_max_iter=10),
        inversion=InversionSettings(method="medi", medi_alpha=2e-4, tv_weak_harmonic=True),
        r2star=R2starSettings(weighted=False))


def test_flat_parameters_are_todays_sidecar():
    flat = QsmParameters().to_flat()
    assert flat == SIDECAR_PARAMETERS
    assert list(flat) == list(SIDECAR_PARAMETERS) == list(PARAMETER_KEYS)
    # 1000.0 and 1000 differ in the JSON text.
    assert {k: type(v) for k, v in flat.items()} == {
        k: type(v) for k, v in SIDECAR_PARAMETERS.items()}
    assert json.dumps(flat) == json.dumps(SIDECAR_PARAMETERS)


def test_every_section_field_has_one_flat_key():
    n_fields = sum(len(dataclasses.fields(getattr(QsmParameters(), s.name)))
                   for s in dataclasses.fields(QsmParameters))
    assert n_fields == len(PARAMETER_KEYS) == len(set(PARAMETER_KEYS))


@pytest.mark.parametrize("params", [QsmParameters(), _varied()])
def test_from_flat_inverts_to_flat(params):
    assert QsmParameters.from_flat(params.to_flat()) == params
    assert QsmParameters.from_flat(dict(reversed(params.to_flat().items()))) == params


def test_from_flat_of_some_keys_keeps_the_other_defaults():
    p = QsmParameters.from_flat({"bfr": "lbv", "inversion": "tkd", "bfr_erode_mm": 2.0})
    assert p.background == BackgroundSettings(method="lbv", erode_mm=2.0)
    assert p.inversion == InversionSettings(method="tkd")
    assert (p.mask, p.field, p.r2star) == (MaskSettings(), FieldSettings(), R2starSettings())
    assert QsmParameters.from_flat({}) == QsmParameters()
    with pytest.raises(ValueError, match="'bfr_method'"):
        QsmParameters.from_flat({"bfr_method": "pdf"})


def test_a_sidecar_written_before_a_key_existed_reads_as_what_ran():
    # Sidecars before "phase_offset" ran the MCPC-3D-S offset held fixed, not today's
    # default; sidecars before the sstv keys never ran sstv, so its defaults are harmless.
    from alsiron.qsm.settings import ADDED_LATER

    old = {k: v for k, v in QsmParameters().to_flat().items()
           if k != "phase_offset" and not k.startswith("sstv_")}
    assert QsmParameters.from_flat(old).field.phase_offset == ADDED_LATER["phase_offset"]
    assert QsmParameters.from_flat(old).field.phase_offset == "fixed"
    # Sidecars before the PDF source options and the refined anchor ran neither.
    older = {k: v for k, v in QsmParameters().to_flat().items()
             if k not in ("pdf_source_smoothing", "pdf_sources", "sstv_refine_iter",
                          "sstv_refine_alpha")}
    read = QsmParameters.from_flat({**older, "inversion": "sstv"})
    assert read.background.pdf_source_smoothing == 0.0
    assert read.background.pdf_sources == "outside_mask"
    assert read.inversion.sstv_refine_iter == 0
    # Sidecars of the refined anchor before the first pass had its own α ran the final
    # pass's α in the first pass.
    stop20 = {k: v for k, v in QsmParameters().to_flat().items() if k != "sstv_refine_alpha"}
    read = QsmParameters.from_flat({**stop20, "inversion": "sstv", "sstv_refine_iter": 20})
    assert read.inversion.sstv_refine_alpha is None
    assert read.inversion.sstv_refine_iter == 20
    # Sidecars before sstv's noise rule ran the final pass at sstv_alpha as given.
    stop21 = {k: v for k, v in QsmParameters().to_flat().items()
              if k not in ("sstv_alpha_rule", "sstv_noise_factor")}
    read = QsmParameters.from_flat({**stop21, "inversion": "sstv"})
    assert read.inversion.sstv_alpha_rule == "fixed"
    assert read.inversion.sstv_refine_alpha == 7e-4
    # A few chosen keys are not a sidecar: the others keep today's defaults.
    assert QsmParameters.from_flat({"inversion": "tkd"}).field.phase_offset == "smoothed"


@pytest.mark.parametrize("make, message", [
    (lambda: MaskSettings(method="fsl"), "unknown brain-mask method 'fsl'"),
    (lambda: FieldSettings(unwrapping="prelude"), "unknown phase unwrapping 'prelude'"),
    (lambda: FieldSettings(phase_offset="mcpc"), "unknown phase offset 'mcpc'"),
    (lambda: BackgroundSettings(method="sharp"), "unknown background-field removal 'sharp'"),
    (lambda: BackgroundSettings(erode_voxels=-1), "bfr_erode_voxels must be >= 0"),
    (lambda: BackgroundSettings(trim_sd_factor=2.0, trim_band_mm=-1.0),
     "bfr_trim_sd_factor must be > 0"),
    (lambda: BackgroundSettings(pdf_source_smoothing=-1e-3), "pdf_source_smoothing must be"),
    (lambda: BackgroundSettings(pdf_sources="skull"), "unknown PDF source region 'skull'"),
    (lambda: InversionSettings(method="qsmnet"), "unknown dipole inversion 'qsmnet'"),
    (lambda: InversionSettings(sstv_refine_iter=-1), "sstv_refine_iter must be"),
    (lambda: InversionSettings(sstv_refine_iter=2.5), "sstv_refine_iter must be"),
    (lambda: InversionSettings(sstv_refine_alpha=0.0), "sstv_refine_alpha must be positive"),
    (lambda: InversionSettings(sstv_alpha_rule="lcurve"), "sstv_alpha_rule must be"),
    (lambda: InversionSettings(sstv_noise_factor=-0.1), "sstv_noise_factor must be"),
    (lambda: dataclasses.replace(BackgroundSettings(), method="sharp"),
     "unknown background-field removal"),
    (lambda: QsmParameters.from_flat({"inversion": "qsmnet"}), "unknown dipole inversion"),
])
def test_sections_check_their_values_on_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_sections_are_frozen():
    p = QsmParameters()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.inversion.method = "tkd"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.background = BackgroundSettings()  # type: ignore[misc]


def test_tv_alpha_option_sets_the_chosen_inversions_weight():
    import click

    from alsiron.cli.qsm import qsm_parameters
    from alsiron.qsm import chain as qsm_chain

    def params(**given):
        base = {"inversion": None, "weak_harmonic": False, "bfr": None, "unwrapping": None,
                "brain_mask_method": None, "bet_f": None, "mask_path": None,
                "mask_erode": None, "phase_quality_threshold": None}
        return qsm_parameters(**{**base, **given})

    default = params()
    # The default inversion (sstv): its final pass's α, held as given.
    p = params(tv_alpha=1.5e-4)
    assert p.inversion.method == "sstv" and p.inversion.sstv_alpha == 1.5e-4
    assert p.inversion.sstv_alpha_rule == "fixed"
    assert p.inversion.masked_tv_alpha == default.inversion.masked_tv_alpha  # untouched
    assert params(inversion="tvmasked", tv_alpha=1.5e-4).inversion.masked_tv_alpha == 1.5e-4
    assert p.inversion.tv_alpha == default.inversion.tv_alpha  # the others untouched
    assert params(inversion="tvadmm", tv_alpha=2e-4).inversion.tv_alpha == 2e-4
    assert params(weak_harmonic=True, tv_alpha=3e-5).inversion.wh_alpha == 3e-5
    medi = params(inversion="medi", tv_alpha=5e-4).inversion
    # A given α is used as given: MEDI's noise rule would otherwise raise it.
    assert medi.medi_alpha == 5e-4 and medi.medi_alpha_rule == "fixed"
    with pytest.raises(click.UsageError, match="--tv-alpha goes with a TV inversion"):
        params(inversion="tkd", tv_alpha=1e-4)
    # sstv: its own α, and its refined anchor (PDF with smooth sources outside the brain,
    # then a first pass) unless --bfr chooses another, which is used as it is.
    sstv = params(inversion="sstv", tv_alpha=1e-4)
    assert sstv.inversion.sstv_alpha == 1e-4 and sstv.background.method == "pdf"
    assert sstv.inversion.sstv_alpha_rule == "fixed"
    anchor = qsm_chain.effective_background(sstv, (1.0, 1.0, 1.0))
    assert anchor.pdf_sources == "outside_brain" and anchor.pdf_source_smoothing == 3e-4
    assert (anchor.pdf_max_iter, anchor.erode_mm) == (25, 2.0)
    assert sstv.inversion.sstv_refine_iter == 80
    # --tv-alpha sets the final pass's α; the first pass keeps its own.
    assert sstv.inversion.sstv_refine_alpha == 7e-4
    # --bfr other than PDF without --inversion: the two-step chain, as before the default
    # was single-step (sstv's anchor is validated with PDF only); with --inversion sstv
    # that removal gives the anchor.
    assert params(bfr="vsharp").inversion.method == "tvmasked"
    assert params(bfr="pdf").inversion.method == "sstv"
    assert params(bfr="lbv", inversion="sstv").inversion.method == "sstv"
    assert params(bfr="lbv", inversion="sstv").background.method == "lbv"
    # The same PDF before a two-step inversion: plain, early-stopped, 4 mm erosion.
    two = qsm_chain.effective_background(params(inversion="tvmasked"), (1.0, 1.0, 1.0))
    assert (two.pdf_sources, two.pdf_source_smoothing, two.pdf_tol) == ("outside_mask",
                                                                        0.0, 3e-3)
    assert two.erode_mm is None and two.pdf_max_iter == 100
    assert params(bfr=None).background.method == default.background.method

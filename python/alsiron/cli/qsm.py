"""``alsiron qsm``: options → :class:`~alsiron.runs.qsm.QsmRunOptions`, then
:func:`alsiron.runs.qsm.run_qsm_subject`, printing each visit's outcome as it comes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click
import numpy as np

from alsiron.cli._options import (
    MaskErosion,
    echo_roi,
    iteration_progress,
    method_choice,
    normative_option,
    progress,
    registry_option,
    roi_options,
    with_roi_options,
)
from alsiron.field.brain_mask import BRAIN_MASK_METHODS
from alsiron.field.echo_fit import UNWRAPPING_METHODS
from alsiron.qsm import chain as qsm_chain
from alsiron.qsm import inversion as inv
from alsiron.qsm.inversion import INVERSION_METHODS
from alsiron.runs import qsm as pipeline
from alsiron.runs.importer import run_qsm_folder
from alsiron.volume import MegreSeries


@click.command("qsm")
@click.argument("subj_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Derivatives folder (default: <dataset>/derivatives/alsiron, or "
                   "derivatives/alsiron beside a plain NIfTI or DICOM folder).")
@click.option("--inversion", type=method_choice(INVERSION_METHODS), default=None,
              help="Dipole inversion (default: the workflow's, see QsmParameters.inversion; "
                   "--list-methods shows it). sstv: single-step, keeps the cortex at the "
                   "brain's edge (its anchor: PDF with smooth sources outside the brain, refined "
                   "by a first pass, unless --bfr chooses another; docs/qsm_anatomy.md).")
@click.option("--weak-harmonic", is_flag=True,
              help="TV-ADMM (--inversion tvadmm, implied) estimating a residual harmonic "
                   "background jointly "
                   "(FANSI-style weak-harmonic term).")
@click.option("--tv-alpha", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="TV weight α of the TV inversions (sstv, tvmasked, tvadmm, medi; default: "
                   "each method's own, e.g. 2e-5 raised with the field noise for sstv, 7e-4 "
                   "for tvmasked; a given α is used as given). Smaller keeps more cortical "
                   "contrast and more noise; docs/qsm_anatomy.md measures it.")
@click.option("--bfr", type=method_choice(qsm_chain.BFR_METHODS,
                                          first=qsm_chain.QsmParameters().background.method),
              default=None,
              help="Background-field removal (default: the workflow's, see QsmParameters.bfr).")
@click.option("--unwrapping", type=method_choice(UNWRAPPING_METHODS),
              default=None, help="Phase unwrapping (default: the workflow's, see "
                                 "QsmParameters.unwrapping).")
@click.option("--phase-unwrapped", is_flag=True,
              help="The phase images are already unwrapped (in space and over echoes): "
                   "fit them without unwrapping.")
@click.option("--fieldmap", "fieldmap_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Total field map NIfTI on the MEGRE grid with a JSON sidecar "
                                 "giving Units (ppm, Hz or rad/s): skips unwrapping and the "
                                 "echo fit.")
@click.option("--mask-erode", type=MaskErosion(), default=None, metavar="MM|Nvox",
              help="Depth in mm eroded from the phase-quality brain mask before background "
                   "removal: voxels whose centre lies within MM of the outside are dropped, "
                   "at any voxel size (default 4 mm for PDF, 6 mm for V-SHARP, iSMV and "
                   "LBV, at least one voxel edge). 'Nvox' (e.g. 2vox) keeps the former "
                   "voxel semantics: N one-voxel erosions. A plain number is mm.")
@click.option("--phase-quality-threshold", type=click.FloatRange(min=0.0, min_open=True),
              default=None,
              help="Exclude voxels whose RMS phase residual of the field fit exceeds this "
                   "[rad] (default 0.5).")
@click.option("--echo-times", type=float, multiple=True,
              help="Echo times in seconds, one per echo (repeat the option), for data whose "
                   "sidecars lack EchoTime.")
@click.option("--field-strength", type=float, default=None,
              help="B0 in tesla, overriding MagneticFieldStrength.")
@click.option("--fill-nonfinite", is_flag=True,
              help="Zero NaN/inf voxels and exclude them from the mask instead of refusing.")
@click.option("--negate-phase", is_flag=True,
              help="Negate the phase (GE scanners), so that paramagnetic χ comes out positive.")
@click.option("--brain-mask", "brain_mask_method", type=method_choice(BRAIN_MASK_METHODS),
              default=None, help="Brain mask from the echo-1 magnitude: 'bet' = deformable "
                                 "surface model (default), 'otsu' = threshold + opening.")
@click.option("--bet-f", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=None, help="BET fractional intensity threshold (default 0.5); "
                                 "smaller values give a larger brain mask.")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Brain mask NIfTI on the MEGRE grid, used instead of the "
                                 "magnitude-derived mask.")
@click.option("--reference-mask", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Reference region (mask or label image on the MEGRE grid): "
                                 "χ = 0 on its mean instead of the whole-brain mean.")
@click.option("--reference-label", type=int, default=None,
              help="With --reference-mask: use the voxels with this label value.")
@click.option("--list-methods", is_flag=True, is_eager=True, expose_value=False,
              callback=lambda ctx, _p, value: _list_methods(ctx) if value else None,
              help="Print the available algorithms and exit.")
@with_roi_options
@click.option("--no-indices", is_flag=True,
              help="Skip the motor-cortex masks and indices at the end of the run.")
@click.option("--no-chain-transfer", is_flag=True,
              help="With a label image finer than the maps: skip the second chain run that "
                   "measures how much of a deep-band χ change the chain returns (the "
                   "chi_precentral_deep_minusWM_gtmrc index).")
@registry_option
@click.option("--no-registry", is_flag=True,
              help="Do not record the sessions in the results registry.")
@normative_option("Normative model JSON (alsiron normative build): print and store z-scores.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def qsm_cmd(subj_dir: Path, out: Path | None, inversion: str | None, weak_harmonic: bool,
            tv_alpha: float | None, bfr: str | None,
            unwrapping: str | None, phase_unwrapped: bool, fieldmap_path: Path | None,
            mask_erode: tuple[str, float] | None, phase_quality_threshold: float | None,
            echo_times: tuple[float, ...], field_strength: float | None,
            fill_nonfinite: bool, negate_phase: bool, brain_mask_method: str | None,
            bet_f: float | None, mask_path: Path | None,
            reference_mask: Path | None, reference_label: int | None,
            labels: Path | None, lut: Path | None, atlas: str | None, t1w: Path | None,
            no_indices: bool, no_chain_transfer: bool, registry: str | None,
            no_registry: bool, normative: Path | None,
            overwrite: bool) -> None:
    """Susceptibility (χ, ppm), R2*/T2*/S0 and field maps for every session of a subject,
    then the motor-cortex indices, the registry record and (with --normative) z-scores.

    SUBJ_DIR: a BIDS sub-XX/ or ses-YY/ folder, or a folder of dcm2niix-style NIfTI + JSON
    (any names) or of DICOM files (one patient, one study), converted on the fly."""
    if reference_label is not None and reference_mask is None:
        raise click.UsageError("--reference-label needs --reference-mask")
    params = qsm_parameters(inversion=inversion, weak_harmonic=weak_harmonic,
                            tv_alpha=tv_alpha, bfr=bfr,
                            unwrapping=unwrapping, brain_mask_method=brain_mask_method,
                            bet_f=bet_f, mask_path=mask_path, mask_erode=mask_erode,
                            phase_quality_threshold=phase_quality_threshold)
    if fieldmap_path is not None and (phase_unwrapped or unwrapping is not None):
        raise click.UsageError("--fieldmap replaces the phase processing; drop "
                               "--phase-unwrapped/--unwrapping")
    if phase_unwrapped and unwrapping is not None:
        raise click.UsageError("--phase-unwrapped skips unwrapping; drop --unwrapping")
    if normative is not None and no_indices:
        raise click.UsageError("--normative scores the indices; drop --no-indices")
    options = pipeline.QsmRunOptions(
        params=params, echo_times=list(echo_times) or None, field_strength=field_strength,
        fill_nonfinite=fill_nonfinite, negate_phase=negate_phase,
        phase_unwrapped=phase_unwrapped, mask_path=mask_path, reference_mask=reference_mask,
        reference_label=reference_label, fieldmap_path=fieldmap_path,
        roi=None if no_indices else dataclasses.replace(
            roi_options(labels, lut, atlas, True, t1w), chain_transfer=not no_chain_transfer),
        registry=registry, record=not no_registry, normative=normative, overwrite=overwrite)
    # Any folder: BIDS as before, or plain NIfTI + JSON / DICOM through a temporary layout.
    outcomes = run_qsm_folder(subj_dir, options, out=out, progress=progress,
                              iteration_progress=iteration_progress,
                              announce=lambda msg: click.echo(msg, err=True))
    any_scored = False
    for oc in outcomes:
        any_scored |= _echo_outcome(oc)
    if normative is None and not no_indices and not any_scored:
        from alsiron.cohort.normative import NO_MODEL_MESSAGE

        click.echo(NO_MODEL_MESSAGE, err=True)


def _tv_alpha_settings(flat: dict, alpha: float) -> dict:
    """The flat parameters --tv-alpha sets for the chosen inversion (for MEDI and sstv
    their noise rule is switched off, so that α holds as given)."""
    method = flat["inversion"]
    if method == "tvmasked":
        return {"masked_tv_alpha": alpha}
    if method == "tvadmm":
        return {"wh_alpha" if flat.get("tv_weak_harmonic") else "tv_alpha": alpha}
    if method == "medi":
        return {"medi_alpha": alpha, "medi_alpha_rule": "fixed"}
    if method == "sstv":
        return {"sstv_alpha": alpha, "sstv_alpha_rule": "fixed"}
    raise click.UsageError(f"--tv-alpha goes with a TV inversion (tvmasked, tvadmm, medi, "
                           f"sstv), not {method}")


# The option → QsmParameters block: every algorithm option of `alsiron qsm` lands here.
def qsm_parameters(*, inversion: str | None, weak_harmonic: bool, bfr: str | None,
                   tv_alpha: float | None = None,
                   unwrapping: str | None, brain_mask_method: str | None,
                   bet_f: float | None, mask_path: Path | None,
                   mask_erode: tuple[str, float] | None,
                   phase_quality_threshold: float | None) -> qsm_chain.QsmParameters:
    """The chain's parameters from the algorithm options (None: the chain's default),
    refusing combinations that contradict each other (``click.UsageError``)."""
    # Options → the sidecar's flat parameter keys (QsmParameters.from_flat).
    default = qsm_chain.QsmParameters()
    flat = default.to_flat()
    given = {"inversion": inversion, "bfr": bfr, "unwrapping": unwrapping,
             "brain_mask_method": brain_mask_method,
             "residual_threshold": phase_quality_threshold}
    flat.update({key: value for key, value in given.items() if value is not None})
    if (bfr is not None and bfr != default.background.method and inversion is None
            and not weak_harmonic and default.inversion.method in inv.SINGLE_STEP_METHODS):
        # A background removal other than the default one names a two-step chain (what
        # --bfr meant before the default became single-step); sstv's anchor is validated
        # with PDF only (docs/qsm_anatomy.md).
        flat["inversion"] = inv.TWO_STEP_DEFAULT
        click.echo(f"note: --bfr {bfr} runs the two-step chain (--inversion "
                   f"{inv.TWO_STEP_DEFAULT}); add --inversion {default.inversion.method} to "
                   f"use {bfr} as the single-step inversion's anchor instead", err=True)
    if weak_harmonic:
        if inversion is None:
            flat["inversion"] = "tvadmm"  # the weak-harmonic term is a TV-ADMM option
        if flat["inversion"] != "tvadmm":
            raise click.UsageError("--weak-harmonic goes with --inversion tvadmm")
        flat["tv_weak_harmonic"] = True
    if tv_alpha is not None:
        flat.update(_tv_alpha_settings(flat, tv_alpha))
    if bet_f is not None:
        if flat["brain_mask_method"] != "bet":
            raise click.UsageError("--bet-f goes with --brain-mask bet")
        flat["bet_f"] = bet_f
    if (brain_mask_method is not None or bet_f is not None) and mask_path is not None:
        raise click.UsageError("--mask gives the brain mask; drop --brain-mask/--bet-f")
    if mask_erode is not None:
        unit, amount = mask_erode
        if unit == "vox":
            flat["bfr_erode_voxels"] = int(amount)
        else:
            flat["bfr_erode_mm"] = float(amount)
    return qsm_chain.QsmParameters.from_flat(flat)


def _phantom_truth(oc: pipeline.SessionOutcome) -> dict[str, str] | None:
    """Accuracy of a session's maps vs the ground truth that ``alsiron phantom`` writes
    beside its data; None (nothing evaluated) for real data."""
    from alsiron.evaluation import truth

    if not truth.has_truth(oc.dataset_root, oc.entities):
        return None
    return truth.compare_with_truth(oc.result, oc.dataset_root, oc.entities)


def _echo_outcome(oc: pipeline.SessionOutcome) -> bool:
    """Print one visit's outcome; True when it printed z-scores."""
    if sys.stderr.isatty():
        click.echo("", err=True)
    click.echo(_summary(oc.label, oc.series, oc.result, oc.seconds, len(oc.written),
                        oc.out_root))
    truth = _phantom_truth(oc)
    if truth:
        click.echo("  vs phantom truth: " + ", ".join(f"{k} {v}" for k, v in truth.items()))
    if oc.roi_error is not None:
        click.echo(f"alsiron: warning: {oc.label}: motor-cortex indices skipped: "
                   f"{oc.roi_error}", err=True)
    elif oc.indices is not None:
        echo_roi(oc.label, oc.indices, oc.roi_written, oc.roi_seconds)
    if oc.registry is not None and oc.record is not None:
        click.echo(f"  registry: {oc.record.subject} {oc.record.session or '-'} run "
                   f"{oc.record.run} recorded in {oc.registry}")
    if oc.zscore_text:
        click.echo(oc.zscore_text)
        return True
    return False


def _list_methods(ctx: click.Context) -> None:
    # The algorithm names and defaults come from the method tables; the descriptions of
    # the steps without a choice are the chain's fixed design.
    default = qsm_chain.QsmParameters()
    lines = [
        "phase unwrapping (--unwrapping): " + ", ".join(
            f"{k}{' (default)' if k == default.field.unwrapping else ''}"
            for k in UNWRAPPING_METHODS)
        + " | --phase-unwrapped | --fieldmap FILE",
        "phase offsets    : MCPC-3D-S (romeo, laplacian); echo differences (echodiff)",
        "echo combination : nonlinear magnitude-weighted complex fit (default), "
        "with a field noise SD map",
        "brain mask       : bet (deformable surface, default; --bet-f) | otsu (threshold + "
        "morphology) [--brain-mask] | --mask FILE",
        "background (--bfr): " + ", ".join(
            f"{k}{' (default)' if k == default.background.method else ''}"
            for k in qsm_chain.BFR_METHODS),
        "inversion (--inversion): " + ", ".join(
            f"{k}{' (default)' if k == default.inversion.method else ''}"
            for k in INVERSION_METHODS) + "; tvadmm --weak-harmonic",
        "reference        : whole-brain mean (default) | --reference-mask FILE "
        "[--reference-label N]",
        "R2*              : weighted log-linear (alsiron relax offers loglinear, arlo, nlls)",
    ]
    click.echo("\n".join(lines))
    ctx.exit(0)


def _summary(label: str, series: MegreSeries, result: qsm_chain.SessionResult, elapsed: float,
             n_written: int, out_root: Path) -> str:
    chi = result.chi.data[np.isfinite(result.chi.data)]
    r2s = result.r2star.data[result.brain_mask.data.astype(bool)]
    r2s = r2s[np.isfinite(r2s)]
    p1, p50, p99 = np.percentile(chi, [1, 50, 99]) if chi.size else (np.nan,) * 3
    te = series.echo_times * 1e3
    voxels = " x ".join(f"{v:.2f}" for v in series.voxel_size)
    return (f"{label}: {series.n_echoes} echoes TE {te[0]:.1f}-{te[-1]:.1f} ms, "
            f"B0 {series.field_strength:g} T, voxels {voxels} mm\n"
            f"  brain mask {result.provenance['BrainMaskVolume_mL']} mL, "
            f"chi p1/p50/p99 {p1:+.3f}/{p50:+.3f}/{p99:+.3f} ppm, "
            f"R2* median {np.median(r2s) if r2s.size else float('nan'):.1f} 1/s\n"
            f"  {n_written} maps written to {out_root} in {elapsed:.1f} s")

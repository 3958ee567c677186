"""Command line: ``alsiron phantom``, ``qsm``, ``relax``, ``roi``, ``registry export``,
``normative``, ``report``, ``longitudinal`` and ``power``.

The CLI only parses options, loads, calls the stage functions and saves; every
:class:`~alsiron.errors.AlsironError` (and a ``ValueError`` from input validation) is
printed as one line with a non-zero exit status.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

from alsiron import __version__

log = logging.getLogger("alsiron")

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130


def _configure_threads(threads: int | None) -> None:
    n = threads
    if n is None and os.environ.get("ALSIRON_NUM_THREADS"):
        try:
            n = int(os.environ["ALSIRON_NUM_THREADS"])
        except ValueError:
            raise click.BadParameter("ALSIRON_NUM_THREADS must be an integer") from None
    if n is not None:
        if n < 1:
            raise click.BadParameter("--threads must be at least 1")
        from alsiron import _core

        if not _core.set_num_threads(n) and _core.num_threads() != n:
            log.warning("thread pool already running with %d threads; --threads %d ignored",
                        _core.num_threads(), n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alsiron")
@click.option("-v", "--verbose", is_flag=True, help="Log details of every step.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.option("--threads", type=int, default=None,
              help="Worker threads for the numerical core (default: all cores, or "
                   "ALSIRON_NUM_THREADS).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, debug: bool, threads: int | None) -> None:
    """alsiron: QSM and R2* iron maps of the motor cortex from multi-echo MRI."""
    ctx.obj = {"debug": debug}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("alsiron: %(levelname)s: %(message)s"))
    root = logging.getLogger("alsiron")
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    _configure_threads(threads)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subjects", type=click.IntRange(1, 999), default=2, show_default=True,
              help="Number of subjects (alternating control / ALS).")
@click.option("--sessions", type=click.IntRange(1, 99), default=1, show_default=True,
              help="Visits per subject.")
@click.option("--matrix", type=click.IntRange(16, 512), default=None,
              help="Matrix size per axis (default: the phantom's default).")
@click.option("--voxel-size", type=float, default=None, help="Isotropic voxel size in mm.")
@click.option("--field-strength", type=float, default=3.0, show_default=True,
              help="B0 in tesla.")
@click.option("--snr", type=float, default=None, help="SNR of the first-echo magnitude in WM.")
@click.option("--b0-direction", type=float, nargs=3, default=None,
              help="B0 direction in voxel-index space (oblique acquisitions), e.g. 0 0.2 1.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--mese", is_flag=True,
              help="Also write a 16-echo multi-echo spin echo with B1 inhomogeneity.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset's files.")
def phantom(out_dir: Path, subjects: int, sessions: int, matrix: int | None,
            voxel_size: float | None, field_strength: float, snr: float | None,
            b0_direction: tuple[float, float, float] | None, seed: int, mese: bool,
            overwrite: bool) -> None:
    """Write a simulated BIDS dataset (MEGRE) with ground truth in derivatives/phantom."""
    from alsiron.sim import phantom as ph

    kwargs: dict[str, object] = {"subjects": subjects, "sessions": sessions,
                                 "field_strength": field_strength, "seed": seed,
                                 "overwrite": overwrite}
    if matrix is not None:
        kwargs["matrix"] = matrix
    if voxel_size is not None:
        kwargs["voxel_size"] = voxel_size
    if snr is not None:
        kwargs["snr"] = snr
    if b0_direction is not None:
        kwargs["b0_direction"] = tuple(b0_direction)
    if mese:
        kwargs["mese"] = ph.MeseProtocol()
    t0 = time.perf_counter()
    root = ph.write_dataset(out_dir, **kwargs)
    click.echo(f"phantom: {subjects} subject(s) x {sessions} session(s) written to {root} "
               f"in {time.perf_counter() - t0:.1f} s")


def _progress(i: int, n: int, message: str) -> None:
    click.echo(f"  [{i + 1}/{n}] {message}", err=True)


def _iteration_progress(iteration: int, max_iter: int) -> None:
    # Redrawn in place on a terminal; silent in logs, where the step lines suffice.
    if sys.stderr.isatty():
        click.echo(f"\r        iteration {iteration}/{max_iter} (stops early when converged)",
                   err=True, nl=False)


def registry_option(func):
    """The ``--registry URL|PATH`` option shared by every command that reads or writes
    the results registry (default: ``$ALSIRON_REGISTRY``, else the dataset's
    ``derivatives/alsiron/registry.sqlite``); resolve it with
    :func:`alsiron.cohort.registry.resolve_location`."""
    return click.option(
        "--registry", "registry", default=None, metavar="URL|PATH",
        help="Results registry: an SQLite file or an SQLAlchemy URL (postgresql://...). "
             "Default: $ALSIRON_REGISTRY, else <dataset>/derivatives/alsiron/registry.sqlite.",
    )(func)


_ROI_OPTIONS = [
    click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Label image (FreeSurfer aparc+aseg / aparc.a2009s, BIDS dseg, ...) "
                      "naming the precentral gyrus; resampled to the maps' grid."),
    click.option("--lut", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Lookup table of --labels (dseg.tsv, CSV index,name or FreeSurfer "
                      "ColorLUT); default: FreeSurfer label values."),
    click.option("--atlas", type=click.Choice(["ho", "juelich"]), default=None,
                 help="Register the bundled MNI template and warp this atlas (Harvard-Oxford "
                      "precentral gyrus or Juelich BA4a+BA4p). Default: a label image found "
                      "in the dataset's derivatives, else ho."),
    click.option("--t1w", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="T1w image for the atlas registration (default: the session's own "
                      "anat/*_T1w.nii[.gz] when present, else the GRE magnitude)."),
]


class MaskErosion(click.ParamType):
    """``--mask-erode``: "4", "4mm" or "4.5 mm" → ("mm", 4.0); "2vox" → ("vox", 2)."""

    name = "mask-erosion"

    def convert(self, value, param, ctx) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip().lower().replace(" ", "")
        unit = "vox" if text.endswith("vox") else "mm"
        number = text.removesuffix("vox").removesuffix("mm")
        try:
            amount = float(number)
        except ValueError:
            self.fail(f"{value!r} is not a depth in mm (e.g. 4 or 4mm) or a voxel count "
                      "(e.g. 2vox)", param, ctx)
        if not (amount >= 0 and amount < float("inf")):
            self.fail(f"{value!r}: the erosion must be >= 0", param, ctx)
        if unit == "vox" and (amount != int(amount) or amount > 10):
            self.fail(f"{value!r}: a voxel erosion is a whole number of voxels, 0-10",
                      param, ctx)
        if unit == "mm" and amount > 30:
            self.fail(f"{value!r}: an erosion deeper than 30 mm leaves no cortex", param, ctx)
        return unit, amount


def _with_roi_options(func):
    for option in reversed(_ROI_OPTIONS):
        func = option(func)
    return func


@cli.command("demo")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subjects", type=click.IntRange(2, 999), default=None,
              help="Participants (alternating control / ALS; default 16).")
@click.option("--sessions", type=click.IntRange(1, 20), default=None,
              help="Visits per participant, about 6 months apart (default 3).")
@click.option("--matrix", type=click.IntRange(32, 256), default=None,
              help="Phantom voxels per axis (default 64).")
@click.option("--voxel-size", type=float, default=None, help="Voxel size in mm (default 3).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier demo.")
def demo_cmd(out_dir: Path, subjects: int | None, sessions: int | None, matrix: int | None,
             voxel_size: float | None, seed: int, overwrite: bool) -> None:
    """Simulate a small trial (controls and ALS, visits, two sites) and run everything:
    maps, indices, registry, normative model, z-scores, longitudinal models, reports."""
    from alsiron.runs import demo

    kwargs = {k: v for k, v in {"subjects": subjects, "sessions": sessions, "matrix": matrix,
                                "voxel_size": voxel_size}.items() if v is not None}
    result = demo.run_demo(out_dir, seed=seed, overwrite=overwrite, say=click.echo, **kwargs)
    for note in result.notes:
        click.echo(f"alsiron: warning: {note}", err=True)
    click.echo(f"demo: {result.n_sessions} sessions; registry {result.registry}; "
               f"reports in {result.derivatives}")


@cli.command("qsm")
@click.argument("subj_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Derivatives folder (default: <dataset>/derivatives/alsiron).")
@click.option("--inversion", type=click.Choice(["tkd", "tikhonov", "ilsqr", "tvadmm",
                                               "tvmasked", "medi", "rts", "ndi"]), default=None,
              help="Dipole inversion (default: the workflow's, see QsmParameters.inversion; "
                   "--list-methods shows it).")
@click.option("--weak-harmonic", is_flag=True,
              help="TV-ADMM (--inversion tvadmm, implied) estimating a residual harmonic "
                   "background jointly "
                   "(FANSI-style weak-harmonic term).")
@click.option("--bfr", type=click.Choice(["pdf", "vsharp", "ismv", "lbv"]), default=None,
              help="Background-field removal (default: the workflow's, see QsmParameters.bfr).")
@click.option("--unwrapping", type=click.Choice(["romeo", "laplacian", "echodiff"]),
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
@click.option("--brain-mask", "brain_mask_method", type=click.Choice(["bet", "otsu"]),
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
@_with_roi_options
@click.option("--no-indices", is_flag=True,
              help="Skip the motor-cortex masks and indices at the end of the run.")
@registry_option
@click.option("--no-registry", is_flag=True,
              help="Do not record the sessions in the results registry.")
@click.option("--normative", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Normative model JSON (alsiron normative build): print and store z-scores.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def qsm_cmd(subj_dir: Path, out: Path | None, inversion: str | None, weak_harmonic: bool,
            bfr: str | None,
            unwrapping: str | None, phase_unwrapped: bool, fieldmap_path: Path | None,
            mask_erode: tuple[str, float] | None, phase_quality_threshold: float | None,
            echo_times: tuple[float, ...], field_strength: float | None,
            fill_nonfinite: bool, negate_phase: bool, brain_mask_method: str | None,
            bet_f: float | None, mask_path: Path | None,
            reference_mask: Path | None, reference_label: int | None,
            labels: Path | None, lut: Path | None, atlas: str | None, t1w: Path | None,
            no_indices: bool, registry: str | None, no_registry: bool, normative: Path | None,
            overwrite: bool) -> None:
    """Susceptibility (χ, ppm), R2*/T2*/S0 and field maps for every session of a subject,
    then the motor-cortex indices, the registry record and (with --normative) z-scores."""
    from alsiron.qsm import chain as workflow
    from alsiron.runs import qsm as pipeline

    if reference_label is not None and reference_mask is None:
        raise click.UsageError("--reference-label needs --reference-mask")
    # Options → the sidecar's flat parameter keys (QsmParameters.from_flat).
    flat = workflow.QsmParameters().to_flat()
    if inversion is not None:
        flat["inversion"] = inversion
    if weak_harmonic:
        if inversion is None:
            flat["inversion"] = "tvadmm"  # the weak-harmonic term is a TV-ADMM option
        if flat["inversion"] != "tvadmm":
            raise click.UsageError("--weak-harmonic goes with --inversion tvadmm")
        flat["tv_weak_harmonic"] = True
    if bfr is not None:
        flat["bfr"] = bfr
    if unwrapping is not None:
        flat["unwrapping"] = unwrapping
    if brain_mask_method is not None:
        flat["brain_mask_method"] = brain_mask_method
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
    if phase_quality_threshold is not None:
        flat["residual_threshold"] = phase_quality_threshold
    if fieldmap_path is not None and (phase_unwrapped or unwrapping is not None):
        raise click.UsageError("--fieldmap replaces the phase processing; drop "
                               "--phase-unwrapped/--unwrapping")
    if phase_unwrapped and unwrapping is not None:
        raise click.UsageError("--phase-unwrapped skips unwrapping; drop --unwrapping")
    if normative is not None and no_indices:
        raise click.UsageError("--normative scores the indices; drop --no-indices")
    params = workflow.QsmParameters.from_flat(flat)
    options = pipeline.QsmRunOptions(
        params=params, echo_times=list(echo_times) or None, field_strength=field_strength,
        fill_nonfinite=fill_nonfinite, negate_phase=negate_phase,
        phase_unwrapped=phase_unwrapped, mask_path=mask_path, reference_mask=reference_mask,
        reference_label=reference_label, fieldmap_path=fieldmap_path,
        roi=None if no_indices else _roi_options(labels, lut, atlas, True, t1w),
        registry=registry, record=not no_registry, normative=normative, overwrite=overwrite)
    outcomes = pipeline.run_qsm_subject(subj_dir, options, out=out, progress=_progress,
                                        iteration_progress=_iteration_progress,
                                        announce=lambda msg: click.echo(msg, err=True))
    any_scored = False
    for oc in outcomes:
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
            _echo_roi(oc.label, oc.indices, oc.roi_written, oc.roi_seconds)
        if oc.registry is not None:
            click.echo(f"  registry: {oc.record.subject} {oc.record.session or '-'} run "
                       f"{oc.record.run} recorded in {oc.registry}")
        if oc.zscore_text:
            click.echo(oc.zscore_text)
            any_scored = True
    if normative is None and not no_indices and not any_scored:
        from alsiron.cohort.normative import NO_MODEL_MESSAGE

        click.echo(NO_MODEL_MESSAGE, err=True)


def _phantom_truth(oc) -> dict[str, str] | None:
    """Accuracy of a session's maps vs the ground truth that ``alsiron phantom`` writes
    beside its data; None (nothing evaluated) for real data."""
    from alsiron.evaluation import truth

    if not truth.has_truth(oc.dataset_root, oc.entities):
        return None
    return truth.compare_with_truth(oc.result, oc.dataset_root, oc.entities)


@cli.command("relax")
@click.argument("subj_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Derivatives folder (default: <dataset>/derivatives/alsiron).")
@click.option("--r2star-method", type=click.Choice(["loglinear", "weighted", "arlo", "nlls"]),
              default="weighted", show_default=True, help="R2* estimator.")
@click.option("--noise-sigma", type=float, default=None,
              help="Noise SD of the magnitude data (Rician NLLS and CRLB maps).")
@click.option("--b0-gradient-correction/--no-b0-gradient-correction", default=True,
              show_default=True,
              help="Correct R2* for intravoxel dephasing in macroscopic field gradients "
                   "(field map from the MEGRE phase).")
@click.option("--field-strength", type=float, default=None,
              help="B0 in tesla, overriding MagneticFieldStrength.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def relax_cmd(subj_dir: Path, out: Path | None, r2star_method: str, noise_sigma: float | None,
              b0_gradient_correction: bool, field_strength: float | None,
              overwrite: bool) -> None:
    """R2*/T2*/S0 (MEGRE), R2/T2/B1 (MESE, EPG) and R2' maps for every session."""
    from alsiron.io import bids as ingest
    from alsiron.io import derivatives
    from alsiron.relax import chain as relax_workflow

    sessions = ingest.find_sessions(subj_dir)
    root = ingest.dataset_root(subj_dir)
    out_root = derivatives.derivatives_root(root, out)
    params = relax_workflow.RelaxParameters(r2star_method=r2star_method,
                                            noise_sigma=noise_sigma,
                                            b0_gradient_correction=b0_gradient_correction)
    for ses in sessions:
        mese_sets = ingest.find_mese_series(ses.series[0].session_dir) if ses.series else []
        if len(mese_sets) > 1:
            log.warning("%d MESE series found; using %s", len(mese_sets), mese_sets[0][0])
        mese = (ingest.load_mese(mese_sets[0], subject=ses.subject, session=ses.session)
                if mese_sets else None)
        for files in ses.series:
            label = files.prefix
            entities = dict(files.entities)
            series = ingest.load_megre(files, subject=ses.subject, session=ses.session,
                                       field_strength=field_strength)
            t0 = time.perf_counter()
            result = relax_workflow.process_relax(series, mese, params)
            maps = result.derivative_maps()
            derivatives.check_free([derivatives.map_path(out_root, entities, m.suffix, m.desc)
                                    for m in maps], overwrite)
            written = derivatives.write_maps(out_root, entities, maps, result.provenance,
                                             overwrite=overwrite)
            r2s = result.r2star.r2star[result.brain_mask]
            line = (f"{label}: R2* ({r2star_method}) median "
                    f"{np.nanmedian(r2s):.1f} 1/s")
            if result.r2prime is not None:
                neg = result.r2prime_summary
                line += (f", R2 median {np.nanmedian(result.r2_on_megre[result.brain_mask]):.1f}"
                         f" 1/s, R2' negative in {neg['NegativeVoxels']} of {neg['Voxels']} "
                         "voxels")
            else:
                line += " (no MESE: R2, T2, B1, R2' skipped)"
            click.echo(line + f"\n  {len(written)} maps written to {out_root} in "
                       f"{time.perf_counter() - t0:.1f} s")


def _load_map(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    import nibabel as nib

    from alsiron.errors import InputError

    if not path.is_file():
        return None
    try:
        img = nib.load(str(path))
        return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, float)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot read image ({exc})") from None


def _roi_options(labels: Path | None, lut: Path | None, atlas: str | None, qc: bool,
                 t1w: Path | None = None):
    from alsiron.runs.roi import RoiOptions

    if lut is not None and labels is None:
        raise click.UsageError("--lut needs --labels")
    if labels is not None and atlas is not None:
        raise click.UsageError("give either --labels or --atlas, not both")
    if t1w is not None and labels is not None:
        raise click.UsageError("--t1w is for the atlas route; drop it or --labels")
    return RoiOptions(labels=labels, lut=lut, atlas=atlas, t1w=t1w, qc=qc)


def _echo_roi(label: str, result, written: list[Path], elapsed: float) -> None:
    from alsiron.motor.indices import summary_lines

    click.echo(f"{label}: motor-cortex indices ({result.parameters['Masks'].get('Route')} "
               f"route), {len(written)} files in {elapsed:.1f} s")
    for line in summary_lines(result):
        click.echo(line)




@cli.command("roi")
@click.argument("subj_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Derivatives folder holding the maps and receiving the outputs (default: "
                   "<dataset>/derivatives/alsiron).")
@_with_roi_options
@click.option("--no-qc", is_flag=True, help="Skip the QC montage PNG.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def roi_cmd(subj_dir: Path, out: Path | None, labels: Path | None, lut: Path | None,
            atlas: str | None, t1w: Path | None, no_qc: bool, overwrite: bool) -> None:
    """Precentral masks and motor-cortex χ / R2* indices from the maps of `alsiron qsm`."""
    import nibabel as nib

    from alsiron.errors import InputError
    from alsiron.field import brain_mask as bm
    from alsiron.io import bids as ingest
    from alsiron.io import derivatives
    from alsiron.runs import roi as roi_workflow

    options = _roi_options(labels, lut, atlas, not no_qc, t1w)
    sessions = ingest.find_sessions(subj_dir)
    root = ingest.dataset_root(subj_dir)
    out_root = derivatives.derivatives_root(root, out)
    for ses in sessions:
        for files in ses.series:
            entities = dict(files.entities)
            roi_workflow.check_outputs_free(out_root, entities, overwrite)
            chi = _load_map(derivatives.map_path(out_root, entities, "Chimap"))
            r2s = _load_map(derivatives.map_path(out_root, entities, "R2starmap"))
            if chi is None and r2s is None:
                raise InputError(derivatives.map_path(out_root, entities, "Chimap"),
                                 "no Chimap or R2starmap found: run `alsiron qsm` first")
            mag_path = files.echoes[0].magnitude
            try:
                mag_img = nib.load(str(mag_path))
                magnitude = np.asarray(mag_img.get_fdata(dtype=np.float32))
            except Exception as exc:  # nibabel raises many types for corrupt files
                raise InputError(mag_path, f"cannot read magnitude ({exc})") from None
            magnitude = magnitude.reshape(magnitude.shape[:3])
            affine = np.asarray(mag_img.affine, float)
            for name, loaded in (("Chimap", chi), ("R2starmap", r2s)):
                if loaded is not None and (loaded[0].shape != magnitude.shape
                                           or not np.allclose(loaded[1], affine, atol=1e-3)):
                    raise InputError(derivatives.map_path(out_root, entities, name),
                                     "not on the grid of the echo-1 magnitude")
            brain_loaded = _load_map(derivatives.map_path(out_root, entities, "mask", "brain"))
            brain = (brain_loaded[0] > 0 if brain_loaded is not None
                     else bm.brain_mask(magnitude))
            t0 = time.perf_counter()
            _, result, written = roi_workflow.run_session(
                out_root, entities, magnitude, affine, brain,
                chi=None if chi is None else chi[0], r2star=None if r2s is None else r2s[0],
                options=options, dataset_root=root, magnitude_name=str(mag_path),
                overwrite=overwrite)
            _echo_roi(files.prefix, result, written, time.perf_counter() - t0)


def _list_methods(ctx: click.Context) -> None:
    from alsiron.field import echo_fit as fieldmap
    from alsiron.qsm import chain as workflow
    from alsiron.qsm import inversion

    default = workflow.QsmParameters()
    lines = [
        "phase unwrapping (--unwrapping): " + ", ".join(
            f"{k}{' (default)' if k == default.field.unwrapping else ''}"
            for k in fieldmap.UNWRAPPING_METHODS)
        + " | --phase-unwrapped | --fieldmap FILE",
        "phase offsets    : MCPC-3D-S (romeo, laplacian); echo differences (echodiff)",
        "echo combination : nonlinear magnitude-weighted complex fit (default), "
        "with a field noise SD map",
        "brain mask       : bet (deformable surface, default; --bet-f) | otsu (threshold + "
        "morphology) [--brain-mask] | --mask FILE",
        "background (--bfr): " + ", ".join(
            f"{k}{' (default)' if k == default.background.method else ''}"
            for k in workflow.BFR_METHODS),
        "inversion (--inversion): " + ", ".join(
            f"{k}{' (default)' if k == default.inversion.method else ''}"
            for k in inversion.INVERSION_METHODS) + "; tvadmm --weak-harmonic",
        "reference        : whole-brain mean (default) | --reference-mask FILE "
        "[--reference-label N]",
        "R2*              : weighted log-linear (alsiron relax offers loglinear, arlo, nlls)",
    ]
    click.echo("\n".join(lines))
    ctx.exit(0)


@cli.group("registry")
def registry_group() -> None:
    """Results registry: one record per processed session, with history."""


@registry_group.command("export")
@click.argument("out_tsv", type=click.Path(dir_okay=False, path_type=Path))
@registry_option
@click.option("--all", "include_history", is_flag=True,
              help="Also export superseded records (with is_current and superseded_at).")
@click.option("--overwrite", is_flag=True, help="Replace an existing TSV.")
def registry_export(out_tsv: Path, registry: str | None, include_history: bool,
                    overwrite: bool) -> None:
    """Write the registry's current records as TSV (plus a JSON data dictionary)."""
    from alsiron.cohort.registry import Registry, resolve_location

    with Registry.open(resolve_location(registry), create=False) as reg:
        n = len(reg.rows(include_history=include_history))
        reg.export_tsv(out_tsv, overwrite=overwrite, include_history=include_history)
    click.echo(f"registry: {n} record(s) written to {out_tsv}")


@cli.group("normative")
def normative_group() -> None:
    """Normative model of the indices in healthy controls (for z-scores)."""


@normative_group.command("build")
@click.option("--group", default="control", show_default=True,
              help="Reference group label (participants.tsv 'group').")
@registry_option
@click.option("--dataset", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="BIDS dataset whose default registry to read (instead of --registry).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Model file to write (JSON).")
@click.option("--index", "indices", multiple=True,
              help="Index to model (repeat); default: every index finite in >= 90 % of the "
                   "controls, voxel counts excepted.")
@click.option("--age-df", type=click.Choice(["auto", "1", "2", "3", "4"]), default="auto",
              show_default=True, help="Age spline degrees of freedom (1 = linear; auto = BIC).")
@click.option("--visits", type=click.Choice(["baseline", "all"]), default="baseline",
              show_default=True, help="One scan per control (earliest) or every visit.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model file.")
def normative_build(group: str, registry: str | None, dataset: Path | None, out: Path,
                    indices: tuple[str, ...], age_df: str, visits: str,
                    overwrite: bool) -> None:
    """Fit the normative model to the registry's GROUP sessions and save it as JSON."""
    from alsiron.cohort.normative import build_normative_model
    from alsiron.cohort.registry import Registry, resolve_location
    from alsiron.errors import OutputExistsError

    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (use --overwrite to replace it)")
    location = resolve_location(registry, dataset)
    with Registry.open(location, create=False) as reg:
        records = reg.sessions()
    model = build_normative_model(records, group=group, indices=list(indices) or None,
                                  age_df="auto" if age_df == "auto" else int(age_df),
                                  visits=visits, source=str(location))  # type: ignore[arg-type]
    model.save(out, overwrite=overwrite)
    c = model.cohort
    click.echo(f"normative: {c['n_sessions']} {group} sessions (sites "
               f"{', '.join(f'{k}: {v}' for k, v in c['n_by_site'].items())}; ages "
               f"{c['age_range_years'][0]:g}-{c['age_range_years'][1]:g}), "
               f"{len(model.indices)} indices, age df {model.age_basis.df}, "
               f"{'EB ' if model.combat.empirical_bayes else ''}ComBat -> {out}")


@cli.command("report")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--cohort", is_flag=True,
              help="Write the cohort page (PATH, if given, is the dataset folder).")
@registry_option
@click.option("--normative", "normative", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Normative model JSON for z-scores and bands.")
@click.option("--qc", "qc_images", multiple=True, type=click.Path(path_type=Path),
              help="QC montage PNG to embed (repeat); default: every PNG under the subject's "
                   "derivatives folder.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: <derivatives>/alsiron/sub-X/sub-X_report.html or "
                   "<derivatives>/alsiron/cohort_report.html).")
@click.option("--overwrite", is_flag=True, help="Replace an existing page.")
def report_cmd(path: Path | None, cohort: bool, registry: str | None,
               normative: Path | None, qc_images: tuple[Path, ...], out: Path | None,
               overwrite: bool) -> None:
    """Self-contained HTML report of a subject (PATH = sub-XX folder) or of the cohort."""
    from alsiron.cohort import report
    from alsiron.cohort.normative import NO_MODEL_MESSAGE, load_model
    from alsiron.cohort.registry import Registry, resolve_location
    from alsiron.io import bids as ingest

    if path is None and not cohort:
        raise click.UsageError("give a subject folder, or --cohort")
    root = ingest.dataset_root(path) if path is not None else None
    location = resolve_location(registry, root)
    model = load_model(normative) if normative is not None else None
    if model is None:
        click.echo(f"report: {NO_MODEL_MESSAGE}", err=True)
    derivs = (root / "derivatives" / "alsiron") if root is not None else Path(".")
    with Registry.open(location, create=False) as reg:
        if cohort:
            records = reg.sessions()
            if not records:
                raise click.UsageError(f"the registry {location} has no sessions")
            page = report.render_cohort_report(records, model=model, model_path=normative)
            target = out or derivs / "cohort_report.html"
        else:
            subject = Path(path).resolve().name  # type: ignore[arg-type]
            records = reg.sessions(subject)
            if not records:
                raise click.UsageError(f"the registry {location} has no sessions of "
                                       f"{subject}: process it first (alsiron qsm)")
            qc = list(qc_images) or report.find_qc_images(derivs / subject)
            page = report.render_subject_report(records, model=model, model_path=normative,
                                                qc_images=qc)
            target = out or derivs / subject / f"{subject}_report.html"
    report.write_report(target, page, overwrite=overwrite)
    click.echo(f"report: {target}")

def _open_registry_records(registry: str | None, dataset_root: Path | None):
    """Current records of the registry named by --registry/$ALSIRON_REGISTRY/the dataset."""
    from alsiron.cohort.registry import Registry, default_registry_path, resolve_location

    if registry is None and dataset_root is None:
        local = default_registry_path(Path.cwd() / "derivatives")
        if local.exists():
            dataset_root = Path.cwd()
    with Registry.open(resolve_location(registry, dataset_root), create=False) as reg:
        return reg.sessions()


def _fmt(value: float, units: str, *, signed: bool = False) -> str:
    """χ in ppb (values are ppm), other units as stored."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if units == "ppm":
        return f"{value * 1000:{'+' if signed else ''}.2f} ppb"
    return f"{value:{'+' if signed else ''}.3g} {units}"


def _retest_from_option(retest_sd: float | None, normative: Path | None, records, index: str):
    """--retest-sd if given, else same-day repeats in the registry, else the normative
    model's residual SD (conservative), else None."""
    from alsiron.cohort import longitudinal as lg

    if retest_sd is not None:
        if not retest_sd > 0:
            raise click.BadParameter("--retest-sd must be positive")
        return lg.RetestSD(sd=retest_sd, source="given")
    found = lg.within_subject_sd(records, index)
    if found is None and normative is not None:
        found = lg.retest_from_normative(normative, index)
    return found


def _retest_line(retest, units: str) -> str:
    if retest is None:
        return ("no test-retest SD (no same-day repeat scans in the registry, no "
                "--retest-sd, no --normative): changes are shown without RCI/MDC")
    where = (f"from {retest.n_pairs} same-day repeat session(s), {retest.df} df"
             if retest.source == "repeat scans" else retest.source)
    return (f"test-retest SD {_fmt(retest.sd, units)} ({where}); "
            f"MDC95 = 2.77 x SD = {_fmt(retest.mdc95, units)} for single scans")


@cli.command("longitudinal")
@click.argument("subj_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--cohort", is_flag=True, help="Every subject, plus the cohort mixed model.")
@click.option("--index", "index", default=None,
              help="Index name (default: chi_precentral_deep_mean).")
@registry_option
@click.option("--retest-sd", type=float, default=None,
              help="Within-subject (test-retest) SD in index units (ppm for χ), e.g. a "
                   "published value; overrides the SD from same-day repeats in the registry.")
@click.option("--normative", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Normative model JSON whose residual SD stands in for the test-retest SD "
                   "when the registry has no same-day repeats (conservative).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the per-visit table as TSV (+ JSON dictionary; with --cohort "
                   "the mixed model as <stem>_model.json).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def longitudinal_cmd(subj_dir: Path | None, cohort: bool, index: str | None,
                     registry: str | None, retest_sd: float | None, normative: Path | None,
                     out: Path | None, overwrite: bool) -> None:
    """Change from baseline (with RCI and MDC95), yearly slopes and the cohort model."""
    from alsiron.cohort import longitudinal as lg
    from alsiron.cohort.records import HEADLINE_INDEX, index_units
    from alsiron.errors import InputError
    from alsiron.io import bids as ingest

    if (subj_dir is None) == (not cohort):
        raise click.UsageError("give SUBJ_DIR or --cohort (not both)")
    index = index or HEADLINE_INDEX
    units = index_units(index)
    dataset_root = ingest.dataset_root(subj_dir) if subj_dir is not None else None
    records = _open_registry_records(registry, dataset_root)
    retest = _retest_from_option(retest_sd, normative, records, index)
    if subj_dir is not None:
        subject = subj_dir.resolve().name
        mine = [r for r in records if r.subject == subject]
        if not mine:
            raise InputError(subj_dir, f"{subject} has no records in the registry (process "
                                       "its sessions first)")
        trajectories = [lg.subject_trajectory(mine, index, retest=retest)]
    else:
        trajectories = lg.cohort_trajectories(records, index, retest=retest)
        if not trajectories:
            raise click.ClickException(f"no subject has a usable {index}")
    click.echo(_retest_line(retest, units))
    model = None
    if subj_dir is not None:
        click.echo(_trajectory_text(trajectories[0], units))
    else:
        click.echo(_cohort_text(trajectories, units))
        model = lg.fit_cohort_model(records, index)
        click.echo(_model_text(model))
    click.echo(f"note: {lg.SINGLE_SUBJECT_CAVEAT}")
    if out is not None:
        lg.write_visit_table(out, trajectories, overwrite=overwrite)
        if model is not None:
            from alsiron.io.atomic import save_json

            save_json(out.with_name(out.stem + "_model.json"), lg.model_summary(model),
                      overwrite=overwrite)
        click.echo(f"written: {out}")


def _trajectory_text(tr, units: str) -> str:
    usable = [v for v in tr.visits if v.n_runs > 0]
    lines = [f"{tr.subject} ({tr.group or 'group n/a'}), {tr.index}: {len(usable)} usable "
             f"visit(s) over {tr.follow_up_years:.2f} years",
             f"  {'session':<10} {'date':<10} {'years':>5}  {'value':>11}  {'change':>11}  "
             f"{'RCI':>6}  {'MDC95':>9}  flags"]
    for v in tr.visits:
        date = (v.acq_time or "n/a")[:10]
        change = "baseline" if v is usable[0] else _fmt(v.change, units, signed=True)
        rci = f"{v.rci:+.2f}" if np.isfinite(v.rci) else "n/a"
        lines.append(f"  {v.session:<10} {date:<10} {v.years:5.2f}  {_fmt(v.value, units):>11}"
                     f"  {change:>11}  {rci:>6}  {_fmt(v.mdc95, units):>9}  "
                     f"{','.join(v.flags)}")
    lo, hi = tr.slope_ci
    ci = (f" (95% CI {_fmt(lo, units, signed=True)} to {_fmt(hi, units, signed=True)})"
          if np.isfinite(lo) else " (no CI: fewer than 3 visits)")
    lines.append(f"  slope {_fmt(tr.slope_per_year, units, signed=True)}/year{ci}")
    return "\n".join(lines)


def _cohort_text(trajectories, units: str) -> str:
    lines = [f"  {'subject':<12} {'group':<8} {'visits':>6} {'years':>5}  "
             f"{'slope/year':>12}  {'95% CI':>25}  >MDC  QC fail"]
    for tr in trajectories:
        lo, hi = tr.slope_ci
        ci = (f"{_fmt(lo, units, signed=True)}..{_fmt(hi, units, signed=True)}"
              if np.isfinite(lo) else "n/a")
        n_mdc = sum("exceeds_mdc" in v.flags for v in tr.visits)
        n_fail = sum("qc_fail" in v.flags for v in tr.visits)
        lines.append(f"  {tr.subject:<12} {(tr.group or 'n/a'):<8} "
                     f"{sum(v.n_runs > 0 for v in tr.visits):>6} {tr.follow_up_years:5.2f}  "
                     f"{_fmt(tr.slope_per_year, units, signed=True):>12}  {ci:>25}  "
                     f"{n_mdc:>4}  {n_fail:>7}")
    return "\n".join(lines)


def _model_text(model) -> str:
    u = model.units
    lines = [f"mixed model {model.index} ~ years * group, random intercept"
             f"{' and slope' if model.random_slopes else ' only'} per subject "
             f"({model.n_subjects} subjects, {model.n_observations} scans):"]
    for group, slope in model.slope_per_year.items():
        lines.append(f"  {group} slope {_fmt(slope, u, signed=True)}/year")
    eff = model.group_time_effect
    if eff is not None:
        lines.append(f"  group x time ({model.group_time_term}) "
                     f"{_fmt(eff['estimate'], u, signed=True)}/year, 95% CI "
                     f"{_fmt(eff['ci_low'], u, signed=True)} to "
                     f"{_fmt(eff['ci_high'], u, signed=True)}, p = {eff['p']:.2g}")
    lines.append(f"  SDs: intercept {_fmt(model.random_intercept_sd, u)}, slope "
                 f"{_fmt(model.random_slope_sd, u)}/year, residual {_fmt(model.residual_sd, u)}")
    lines += [f"  note: {n}" for n in model.notes]
    return "\n".join(lines)


@cli.command("power")
@registry_option
@click.option("--index", "index", default=None,
              help="Index name (default: chi_precentral_deep_mean).")
@click.option("--slowing", type=click.FloatRange(0, 1, min_open=True), default=0.3,
              show_default=True, help="Fraction of the yearly slope removed by treatment.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.05, show_default=True, help="Two-sided significance level.")
@click.option("--power", "target_power", type=click.FloatRange(0, 1, min_open=True,
              max_open=True), default=0.8, show_default=True, help="Target power.")
@click.option("--visits", default=None, metavar="T0,T1,...",
              help="Visit times in years (default: the cohort's median schedule).")
@click.option("--duration", type=float, default=None,
              help="Trial length in years (with --interval-months).")
@click.option("--interval-months", type=float, default=None, help="Months between visits.")
@click.option("--group", default=None, help="Group to treat (default: the non-control group).")
@click.option("--slope", "slope_kind", type=click.Choice(["excess", "total"]), default="excess",
              show_default=True, help="Slow the group's slope beyond controls' (excess) or "
                                      "its whole slope (total).")
@click.option("--slope-per-year", type=float, default=None,
              help="Planning without a registry: the yearly slope to slow (index units).")
@click.option("--residual-sd", type=float, default=None,
              help="Planning without a registry: residual (scan) SD (index units).")
@click.option("--slope-sd", type=float, default=0.0, show_default=True,
              help="Planning without a registry: between-subject SD of slopes (units/year).")
@click.option("--simulate", "n_sims", type=click.IntRange(0, 100_000), default=1000,
              show_default=True, help="Trials to simulate to check the formula (0: skip).")
@click.option("--seed", type=int, default=0, show_default=True, help="Simulation seed.")
def power_cmd(registry: str | None, index: str | None, slowing: float, alpha: float,
              target_power: float, visits: str | None, duration: float | None,
              interval_months: float | None, group: str | None, slope_kind: str,
              slope_per_year: float | None, residual_sd: float | None, slope_sd: float,
              n_sims: int, seed: int) -> None:
    """Participants per arm to detect a slowing of the index's yearly slope."""
    import math

    from alsiron.cohort import longitudinal as lg
    from alsiron.cohort import power as pw
    from alsiron.cohort.records import HEADLINE_INDEX, index_units

    index = index or HEADLINE_INDEX
    units = index_units(index)
    schedule = None
    if visits is not None:
        try:
            schedule = tuple(float(x) for x in visits.split(","))
        except ValueError:
            raise click.BadParameter(f"--visits must be comma-separated years, got {visits!r}"
                                     ) from None
    elif (duration is None) != (interval_months is None):
        raise click.UsageError("--duration and --interval-months go together")
    elif duration is not None:
        schedule = pw.schedule(duration, interval_months)
    if (slope_per_year is None) != (residual_sd is None):
        raise click.UsageError("--slope-per-year and --residual-sd go together")
    if slope_per_year is not None:
        if schedule is None:
            raise click.UsageError("planning without a registry needs --visits or "
                                   "--duration with --interval-months")
        design = pw.PowerDesign(visit_years=schedule, slope_per_year=slope_per_year,
                                slowing=slowing, residual_sd=residual_sd,
                                random_slope_sd=slope_sd, alpha=alpha, power=target_power)
        click.echo("from the given slope and SDs")
    else:
        model = lg.fit_cohort_model(_open_registry_records(registry, None), index)
        click.echo(_model_text(model))
        design = pw.design_from_model(model, slowing, visit_years=schedule,
                                      treated_group=group, slope=slope_kind, alpha=alpha,
                                      power=target_power)
    n = pw.participants_per_arm(design)
    visits_text = ", ".join(f"{t:.2f}" for t in design.visit_years)
    slope_text = _fmt(design.slope_per_year, units, signed=True)
    click.echo(f"design: visits at {visits_text} years; slope {slope_text}/year, "
               f"{slowing:.0%} slowing = {_fmt(design.effect_per_year, units, signed=True)}/year; "
               f"alpha {alpha:g}, power {target_power:g}")
    click.echo(f"participants per arm: {math.ceil(n)} (formula 2(z_a/2+z_b)^2 (s_slope^2 + "
               f"s_e^2/Sxx) / D^2 = {n:.1f}; no dropout)")
    if n_sims > 0:
        achieved, se = pw.simulate_power(design, math.ceil(n), n_sims=n_sims, seed=seed)
        click.echo(f"simulation ({n_sims} trials, Welch t-test on per-subject slopes): power "
                   f"{achieved:.3f} +/- {se:.3f} with {math.ceil(n)} per arm")


def _summary(label: str, series, result, elapsed: float, n_written: int, out_root: Path) -> str:
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


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit status (also used by tests in-process)."""
    from alsiron.errors import AlsironError

    debug = "--debug" in (args if args is not None else sys.argv[1:])
    try:
        cli.main(args=args, prog_name="alsiron", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("alsiron: aborted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("alsiron: interrupted; no partial outputs were left", err=True)
        return EXIT_INTERRUPTED
    except (AlsironError, ValueError) as exc:
        if debug:
            raise
        click.echo(f"alsiron: error: {exc}", err=True)
        return EXIT_INPUT_ERROR
    return 0


def entry_point() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry_point()

"""Command line: ``alsiron phantom``, ``alsiron qsm`` and ``alsiron relax``.

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
    from alsiron import phantom as ph

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


@cli.command("qsm")
@click.argument("subj_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Derivatives folder (default: <dataset>/derivatives/alsiron).")
@click.option("--inversion", type=click.Choice(["tvadmm", "tkd"]), default="tvadmm",
              show_default=True, help="Dipole inversion.")
@click.option("--bfr", type=click.Choice(["pdf", "vsharp", "ismv", "lbv"]), default=None,
              help="Background-field removal (default: the workflow's, see QsmParameters.bfr).")
@click.option("--echo-times", type=float, multiple=True,
              help="Echo times in seconds, one per echo (repeat the option), for data whose "
                   "sidecars lack EchoTime.")
@click.option("--field-strength", type=float, default=None,
              help="B0 in tesla, overriding MagneticFieldStrength.")
@click.option("--fill-nonfinite", is_flag=True,
              help="Zero NaN/inf voxels and exclude them from the mask instead of refusing.")
@click.option("--negate-phase", is_flag=True,
              help="Negate the phase (GE scanners), so that paramagnetic χ comes out positive.")
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
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def qsm_cmd(subj_dir: Path, out: Path | None, inversion: str, bfr: str | None,
            echo_times: tuple[float, ...], field_strength: float | None,
            fill_nonfinite: bool, negate_phase: bool, mask_path: Path | None,
            reference_mask: Path | None, reference_label: int | None,
            overwrite: bool) -> None:
    """Susceptibility (χ, ppm), R2*/T2*/S0 and field maps for every session of a subject."""
    from alsiron import derivatives, ingest, workflow
    from alsiron.evaluate import compare_with_truth

    if reference_label is not None and reference_mask is None:
        raise click.UsageError("--reference-label needs --reference-mask")
    sessions = ingest.find_sessions(subj_dir)
    root = ingest.dataset_root(subj_dir)
    out_root = derivatives.derivatives_root(root, out)
    params = workflow.QsmParameters(inversion=inversion)
    if bfr is not None:
        params.bfr = bfr
    for ses in sessions:
        for files in ses.series:
            label = files.prefix
            entities = dict(files.entities)
            names = [derivatives.map_path(out_root, entities, m_suffix, m_desc)
                     for m_suffix, m_desc in workflow.OUTPUT_NAMES]
            derivatives.check_free(names, overwrite)
            click.echo(f"{label}: loading {len(files.echoes)} echoes", err=True)
            series = ingest.load_megre(files, subject=ses.subject, session=ses.session,
                                       echo_times=list(echo_times) or None,
                                       field_strength=field_strength,
                                       fill_nonfinite=fill_nonfinite,
                                       negate_phase=negate_phase)
            user_mask = None
            if mask_path is not None:
                user_mask = ingest.load_mask(mask_path, series)
                series.metadata["BrainMaskSource"] = str(mask_path)
            ref_region = None
            if reference_mask is not None:
                ref_region = ingest.load_mask(reference_mask, series, label=reference_label)
                series.metadata["ReferenceSource"] = (
                    str(reference_mask) if reference_label is None
                    else f"{reference_mask} label {reference_label}")
            t0 = time.perf_counter()
            result = workflow.process_series(series, params, brain_mask=user_mask,
                                             reference_mask=ref_region,
                                             progress=_progress,
                                             iteration_progress=_iteration_progress)
            if sys.stderr.isatty():
                click.echo("", err=True)
            written = derivatives.write_maps(out_root, entities, result.derivative_maps(),
                                             result.provenance, overwrite=overwrite)
            elapsed = time.perf_counter() - t0
            click.echo(_summary(label, series, result, elapsed, len(written), out_root))
            truth = compare_with_truth(result, root, entities)
            if truth:
                click.echo("  vs phantom truth: " + ", ".join(f"{k} {v}" for k, v in truth.items()))


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
    from alsiron import derivatives, ingest, relax_workflow

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


def _list_methods(ctx: click.Context) -> None:
    from alsiron import workflow

    default = workflow.QsmParameters()
    lines = [
        "phase unwrapping : quality-guided region growing + temporal unwrapping (only one)",
        "echo combination : magnitude-weighted linear fit of phase over TE (only one)",
        "brain mask       : magnitude threshold + morphology (default) | --mask FILE",
        "background (--bfr): " + ", ".join(
            f"{k}{' (default)' if k == default.bfr else ''}" for k in workflow.BFR_METHODS),
        "inversion        : tvadmm (default), tkd",
        "reference        : whole-brain mean (default) | --reference-mask FILE "
        "[--reference-label N]",
        "R2*              : weighted log-linear (alsiron relax offers loglinear, arlo, nlls)",
    ]
    click.echo("\n".join(lines))
    ctx.exit(0)


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

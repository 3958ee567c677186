"""``alsiron phantom`` and ``alsiron demo``: simulated data, and a simulated trial run end
to end (:mod:`alsiron.runs.phantom`, :mod:`alsiron.runs.demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from alsiron.cli._options import method_choice
from alsiron.qsm.inversion import INVERSION_METHODS


@click.command()
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
@click.option("--anatomy", type=click.Choice(["geometric", "template"]), default="geometric",
              show_default=True,
              help="Head: the ellipsoid phantom, or folded cortex from the MNI152 template "
                   "deformed per subject (default matrix covers 192 x 240 x 224 mm).")
@click.option("--shim/--no-shim", default=True, show_default=True,
              help="Template head: shim B0 over the brain (0th- to 2nd-order spherical "
                   "harmonics) before the phase is formed, as a scanner does.")
def phantom(out_dir: Path, subjects: int, sessions: int, matrix: int | None,
            voxel_size: float | None, field_strength: float, snr: float | None,
            b0_direction: tuple[float, float, float] | None, seed: int, mese: bool,
            overwrite: bool, anatomy: str, shim: bool) -> None:
    """Write a simulated BIDS dataset (MEGRE) with ground truth in derivatives/phantom."""
    from alsiron.runs.phantom import run_phantom

    done = run_phantom(out_dir, subjects=subjects, sessions=sessions, matrix=matrix,
                       voxel_size=voxel_size, field_strength=field_strength, snr=snr,
                       b0_direction=b0_direction, seed=seed, mese=mese, overwrite=overwrite,
                       anatomy=anatomy, shim=shim)
    click.echo(f"phantom: {subjects} subject(s) x {sessions} session(s) written to {done.root} "
               f"in {done.seconds:.1f} s")


@click.command("demo")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subjects", type=click.IntRange(2, 999), default=None,
              help="Participants (alternating control / ALS; default 16).")
@click.option("--sessions", type=click.IntRange(1, 20), default=None,
              help="Visits per participant, about 6 months apart (default 3).")
@click.option("--matrix", type=click.IntRange(32, 256), default=None,
              help="Phantom voxels per axis (default 64; with --anatomy template, the "
                   "anatomical field of view).")
@click.option("--voxel-size", type=float, default=None,
              help="Voxel size in mm (default 3; 2.5 with --anatomy template).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier demo.")
@click.option("--anatomy", type=click.Choice(["geometric", "template"]), default="geometric",
              show_default=True,
              help="Participants' heads: the ellipsoid phantom, or folded cortex from the "
                   "MNI152 template deformed per participant (B0 shimmed; slower).")
@click.option("--inversion", type=method_choice(INVERSION_METHODS), default=None,
              help="QSM inversion, as in alsiron qsm (default: the chain's).")
@click.option("--shim/--no-shim", default=True, show_default=True,
              help="Template heads: shim B0 over the brain (2nd order) before the phase is "
                   "formed, as a scanner does (as in alsiron phantom).")
def demo_cmd(out_dir: Path, subjects: int | None, sessions: int | None, matrix: int | None,
             voxel_size: float | None, seed: int, overwrite: bool, anatomy: str,
             inversion: str | None, shim: bool) -> None:
    """Simulate a small trial (controls and ALS, visits, two sites) and run everything:
    maps, indices, registry, normative model, z-scores, longitudinal models, reports."""
    from alsiron.cli.qsm import qsm_parameters
    from alsiron.runs import demo

    kwargs = {k: v for k, v in {"subjects": subjects, "sessions": sessions, "matrix": matrix,
                                "voxel_size": voxel_size}.items() if v is not None}
    params = qsm_parameters(inversion=inversion, weak_harmonic=False, bfr=None,
                            unwrapping=None, brain_mask_method=None, bet_f=None,
                            mask_path=None, mask_erode=None, phase_quality_threshold=None)
    if not shim and anatomy != "template":
        raise click.UsageError("--no-shim goes with --anatomy template (the geometric head "
                               "has no shim)")
    result = demo.run_demo(out_dir, seed=seed, overwrite=overwrite, anatomy=anatomy,
                           params=params, shim=shim, say=click.echo, **kwargs)
    for note in result.notes:
        click.echo(f"alsiron: warning: {note}", err=True)
    click.echo(f"demo: {result.n_sessions} sessions; registry {result.registry}; "
               f"reports in {result.derivatives}")
